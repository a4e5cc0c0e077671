"""The OpenAI-compatible server, as a real uvicorn process on 127.0.0.1 driven by a real HTTP client: completions,
echo log-probs equal to the model's own, concurrent requests (batched, each equal to its answer alone), streaming,
bad requests (4xx naming the field), API key (401) and body size (413)."""

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.decode import SentencePieceTokenizer
import serve_helper  # tests/ is on sys.path (pytest rootdir-relative import)

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  """(base url, tokenizer path): a uvicorn process serving serve_helper's model; killed at the end."""
  tmp = tmp_path_factory.mktemp("serve")
  tok = serve_helper.train_tokenizer(tmp)
  port = _free_port()
  log = open(tmp / "server.log", "w")
  env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "serve_helper.py"), str(port), tok, KEY],
                          stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + 600
    while True:
      if proc.poll() is not None:
        pytest.fail(f"server exited with {proc.returncode}:\n{(tmp / 'server.log').read_text()[-3000:]}")
      try:
        if httpx.get(f"{url}/health", headers=AUTH, timeout=2).status_code == 200:
          break
      except httpx.TransportError:
        pass
      if time.monotonic() > deadline:
        pytest.fail("server did not come up in 600 s")
      time.sleep(0.5)
    yield url, tok
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    log.close()


def _post(url, body, headers=AUTH, **kw):
  return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120, **kw)


@pytest.fixture(scope="module")
def log_softmax():
  """The model's own log-probs (a full forward pass in this process), for token rows of any length."""
  model = serve_helper.build_model()
  f = nnx.jit(lambda m, t: jax.nn.log_softmax(m(t)[0], axis=-1))
  return lambda ids: np.asarray(f(model, jnp.asarray([ids], jnp.int32)))[0]


def test_api_key_is_checked_on_every_endpoint(server):
  url, _ = server
  for method, path in [("GET", "/v1/models"), ("GET", "/health"), ("POST", "/v1/completions"), ("POST", "/tokenize")]:
    for headers in ({}, {"Authorization": "Bearer wrong-key-000"}, {"Authorization": KEY}):
      r = httpx.request(method, f"{url}{path}", headers=headers, json={"prompt": "the"}, timeout=30)
      assert r.status_code == 401, (path, headers)
      assert r.json()["error"]["type"] == "authentication_error"
  r = httpx.get(f"{url}/v1/models", headers=AUTH, timeout=30)
  assert r.status_code == 200 and r.json()["data"][0]["id"] == "engram"


def test_echo_logprobs_equal_the_models_logprobs(server, log_softmax):
  """lm-evaluation-harness's scoring request: token ids, echo, logprobs=1, max_tokens=1, temperature 0."""
  url, tok = server
  n = SentencePieceTokenizer(tok).vocab_size  # the model's vocabulary is larger: ids >= n are never drawn
  prompts = [[5, 9, 13, 4, 22, 7, 30], [3, 8]]
  r = _post(url, {"model": "engram", "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1,
                  "temperature": 0, "seed": 1234})
  assert r.status_code == 200, r.text
  for ids, choice in zip(prompts, r.json()["choices"]):
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    full = log_softmax(ids)
    want = full[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(lp["token_logprobs"][1:len(ids)], want, atol=2e-5)
    np.testing.assert_allclose(lp["token_logprobs"][-1], full[-1, :n].max(), atol=2e-5)  # the greedy continuation
    for j in range(1, len(ids)):  # the top-1 alternative is the most likely id the tokenizer has
      assert list(lp["top_logprobs"][j].values())[0] == pytest.approx(full[j - 1, :n].max(), abs=2e-5)
  # max_tokens=0 with echo scores the prompt only.
  r = _post(url, {"prompt": prompts[0], "echo": True, "logprobs": 0, "max_tokens": 0})
  assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == len(prompts[0])


def test_text_completion_and_concurrent_requests_are_batched(server):
  url, tok = server
  bodies = [{"prompt": p, "max_tokens": 6, "temperature": t, "seed": 3}
            for p in ("the cat sat", "a dog ran far", "the big red house", "green door", "far away")
            for t in (0.0, 0.8)]
  alone = [_post(url, b).json() for b in bodies[:3]]
  before = httpx.get(f"{url}/health", headers=AUTH, timeout=30).json()
  with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
    together = list(pool.map(lambda b: _post(url, b), bodies))
  after = httpx.get(f"{url}/health", headers=AUTH, timeout=30).json()
  assert all(r.status_code == 200 for r in together)
  assert after["prompts"] - before["prompts"] == len(bodies)
  assert after["batches"] - before["batches"] < len(bodies)  # some requests shared a batch
  for a, r in zip(alone, together):
    assert r.json()["choices"][0]["text"] == a["choices"][0]["text"]
  c = alone[0]
  assert c["object"] == "text_completion" and c["choices"][0]["finish_reason"] in ("length", "stop")
  assert c["usage"]["prompt_tokens"] == len(SentencePieceTokenizer(tok).encode("the cat sat"))
  # Streaming gives the same text, then [DONE].
  r = _post(url, {**bodies[0], "stream": True})
  events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
  assert events[-1] == "[DONE]"
  chunks = [json.loads(e) for e in events[:-1]]
  assert "".join(ch["choices"][0]["text"] for ch in chunks) == alone[0]["choices"][0]["text"]
  assert chunks[-1]["choices"][0]["finish_reason"] == alone[0]["choices"][0]["finish_reason"]


@pytest.mark.parametrize("body, param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [5, 999]}, "prompt"),
    ({"prompt": [[1]] * 5}, "prompt"),
    ({"prompt": [4] * 47, "max_tokens": 8}, "prompt"),  # longer than the context with max_tokens
    ({"prompt": "the", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "the", "max_tokens": -3}, "max_tokens"),
    ({"prompt": "the", "max_tokens": 10_000}, "max_tokens"),
    ({"prompt": "the", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "the", "temperature": "hot"}, "temperature"),
    ({"prompt": "the", "top_p": 0}, "top_p"),
    ({"prompt": "the", "logprobs": 99}, "logprobs"),
    ({"prompt": "the", "n": 2}, "n"),
    ({"prompt": "the", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "the", "stop": 7}, "stop"),
    ({"max_tokens": 3}, "prompt"),
])
def test_bad_requests_get_400_naming_the_field(server, body, param):
  url, _ = server
  r = _post(url, body)
  assert r.status_code == 400, r.text
  err = r.json()["error"]
  assert err["param"] == param and param in err["message"]


def test_other_bad_requests_and_the_server_survives(server):
  url, _ = server
  r = httpx.post(f"{url}/v1/completions", content=b"{not json", headers=AUTH, timeout=30)
  assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
  r = _post(url, {"prompt": "the", "model": "gpt-4"})
  assert r.status_code == 404 and r.json()["error"]["param"] == "model"
  big = {"prompt": "the " * 2000}  # > 4096 bytes
  r = _post(url, big)
  assert r.status_code == 413
  chunks = (b"x" * 1000 for _ in range(10))  # chunked transfer, no content-length
  r = httpx.post(f"{url}/v1/completions", content=chunks, headers=AUTH, timeout=30)
  assert r.status_code == 413
  r = _post(url, {"prompt": "the cat", "max_tokens": 2})
  assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
  r = httpx.post(f"{url}/tokenize", json={"prompt": "the cat"}, headers=AUTH, timeout=30)
  ids = r.json()["tokens"]
  r = httpx.post(f"{url}/detokenize", json={"tokens": ids}, headers=AUTH, timeout=30)
  assert r.json()["prompt"] == "the cat"
