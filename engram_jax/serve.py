"""OpenAI-compatible completions server over a decode.Engine (FastAPI + uvicorn).

    python -m engram_jax.serve --gin.CHECKPOINT_PATH=DIR [--port 8000] [--host 127.0.0.1]
    (API key: set ENGRAM_API_KEY in the environment, or --gin.ServeConfig.api_key; engine and server settings as
    in configs/runs/generate.gin, e.g. --gin.DecodeConfig.batch_size=16 --gin.DecodeConfig.table_placement="'host'")

Endpoints (every one checks `Authorization: Bearer <key>` when an API key is set):
  POST /v1/completions   prompt (text, token ids, or a list of either), max_tokens, temperature, top_p, top_k, seed,
                         stop, logprobs (top alternatives, <= DecodeConfig.top_logprobs), echo (prompt log-probs, so
                         log-likelihood scoring works; max_tokens=0 with echo scores only), stream (server-sent events)
  GET  /v1/models        the served model
  GET  /health           liveness
  GET  /tokenizer_info, POST /tokenize, POST /detokenize   the model's own tokenizer, remotely (lm-evaluation-harness's
                         local-completions backend uses these when they exist)
Requests from concurrent clients are batched: a worker thread collects what arrives within `batch_wait_ms` (up to
the engine's batch size) and runs it as one batch. Bounds (body bytes, prompts per request, prompt + max_tokens within
the context, max_tokens, rows waiting) keep any request from exhausting host memory; violations get a 4xx whose
message names the field (413 for an oversized body, 401 for a missing or wrong key, 503 when the queue is full).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hmac
import json
import logging
import queue
import secrets
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from starlette.requests import Request as HttpRequest  # module level: FastAPI resolves annotations by name

from engram_jax.decode import Completion, Engine, Request, SamplingParams, Tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  """Network settings and the bounds on what one client may ask for."""

  host: str = "127.0.0.1"  # Loopback only unless set otherwise (e.g. 0.0.0.0 to listen on every interface).
  port: int = 8000
  api_key: str | None = None  # When set, every request needs `Authorization: Bearer <api_key>`.
  model_name: str = "engram"  # Reported by /v1/models; requests may name it (any other name is a 404).
  max_body_bytes: int = 1 << 20  # Larger request bodies get 413 before they are parsed.
  max_prompts: int = 64  # Prompts in one request.
  max_tokens_limit: int = 1024  # Upper bound on max_tokens (the context bounds prompt + max_tokens as well).
  max_stop: int = 4  # Stop strings per request (OpenAI's limit), each at most 256 characters.
  max_pending: int = 1024  # Prompts waiting for the engine; beyond this new requests get 503.
  batch_wait_ms: float = 5.0  # How long the batcher waits for more requests to fill a batch.
  max_connections: int = 256  # uvicorn's limit_concurrency: connections beyond this get 503.

  def __post_init__(self):
    for name in ("max_body_bytes", "max_prompts", "max_tokens_limit", "max_pending", "max_connections"):
      if getattr(self, name) < 1:
        raise ValueError(f"ServeConfig.{name}={getattr(self, name)} must be >= 1")
    if not 0 <= self.port < 65536:
      raise ValueError(f"ServeConfig.port={self.port} must lie in [0, 65536)")
    if self.api_key is not None and len(self.api_key) < 8:
      raise ValueError("ServeConfig.api_key must be at least 8 characters (or None for no key)")


class ApiError(Exception):
  """An error answered as OpenAI's {'error': {message, type, param, code}} with an HTTP status."""

  def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.kind = status, message, param, kind

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


# ----------------------------------------------------------------------------------------------------------------
# Batching worker
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Job:
  requests: list[Request]
  future: concurrent.futures.Future
  on_token: Any = None  # callable(prompt index, token id, text) or None


class Batcher:
  """Runs the engine on one worker thread; requests that arrive together are generated together."""

  def __init__(self, engine: Engine, *, wait_s: float = 0.005, max_pending: int = 1024):
    self.engine, self.wait_s, self.max_pending = engine, wait_s, max_pending
    self.queue: queue.Queue[_Job] = queue.Queue()
    self.pending = 0
    self.batches = 0  # engine calls so far
    self.prompts = 0  # prompts generated so far
    self.lock = threading.Lock()
    self.thread = threading.Thread(target=self._loop, name="engram-batcher", daemon=True)
    self.thread.start()

  def submit(self, requests: list[Request], on_token=None) -> concurrent.futures.Future:
    with self.lock:
      if self.pending + len(requests) > self.max_pending:
        raise ApiError(503, f"server busy: {self.pending} prompts are waiting (limit {self.max_pending}); retry later",
                       kind="server_error")
      self.pending += len(requests)
    job = _Job(requests, concurrent.futures.Future(), on_token)
    self.queue.put(job)
    return job.future

  def _loop(self):
    while True:
      jobs = [self.queue.get()]
      rows = len(jobs[0].requests)
      deadline = time.monotonic() + self.wait_s
      while rows < self.engine.config.batch_size:
        try:
          job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
          break
        jobs.append(job)
        rows += len(job.requests)
      self._run(jobs)

  def _run(self, jobs: list[_Job]):
    requests = [r for job in jobs for r in job.requests]
    owner = [(j, k) for j, job in enumerate(jobs) for k in range(len(job.requests))]

    def on_token(i, tok, text):
      j, k = owner[i]
      if jobs[j].on_token is not None:
        jobs[j].on_token(k, tok, text)

    try:
      results = self.engine.generate(requests, on_token)
    except Exception as e:  # a failure fails these requests, never the worker
      log.exception("generation failed")
      for job in jobs:
        job.future.set_exception(e)
    else:
      start = 0
      for job in jobs:
        job.future.set_result(results[start:start + len(job.requests)])
        start += len(job.requests)
    finally:
      with self.lock:
        self.pending -= len(requests)
        self.batches += 1
        self.prompts += len(requests)


# ----------------------------------------------------------------------------------------------------------------
# Request checking and response building
# ----------------------------------------------------------------------------------------------------------------


def _prompts(prompt: Any, tokenizer: Tokenizer, vocab_size: int) -> list[list[int]]:
  """OpenAI's prompt forms (str, [str], [int], [[int]]) -> token id lists; ApiError naming `prompt` otherwise."""
  if isinstance(prompt, str):
    items = [prompt]
  elif isinstance(prompt, list) and prompt and all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
    items = [prompt]
  elif isinstance(prompt, list) and prompt:
    items = prompt
  else:
    raise ApiError(400, "prompt: must be a non-empty string, list of strings, list of token ids, or list of lists of "
                   "token ids", "prompt")
  out = []
  for i, item in enumerate(items):
    where = "prompt" if len(items) == 1 else f"prompt[{i}]"
    if isinstance(item, str):
      ids = tokenizer.encode(item)
    elif isinstance(item, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in item):
      ids = item
      bad = [x for x in ids if not 0 <= x < vocab_size]
      if bad:
        raise ApiError(400, f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "prompt")
    else:
      raise ApiError(400, f"{where}: must be a string or a list of token ids", "prompt")
    if not ids:
      raise ApiError(400, f"{where}: is empty (no tokens); send at least one token", "prompt")
    out.append(list(ids))
  return out


def _field(body: dict, name: str, kind, default, lo=None, hi=None):
  """body[name] checked for type and range; ApiError(400) naming the field."""
  value = body.get(name, default)
  if value is None:
    return default
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
    raise ApiError(400, f"{name}: expected {kind.__name__}, got {type(value).__name__} {value!r}", name)
  if lo is not None and value < lo or hi is not None and value > hi:
    raise ApiError(400, f"{name}: {value!r} is outside [{lo}, {hi}]", name)
  return value


@dataclasses.dataclass
class Parsed:
  requests: list[Request]
  echo: bool
  logprobs: int | None
  stream: bool
  prompts: list[list[int]]


def parse_completion(body: Any, engine: Engine, tokenizer: Tokenizer, config: ServeConfig) -> Parsed:
  """Checks a /v1/completions body against the OpenAI schema and this server's bounds."""
  if not isinstance(body, dict):
    raise ApiError(400, "request body: expected a JSON object", None)
  if "prompt" not in body:
    raise ApiError(400, "prompt: required", "prompt")
  model = body.get("model")
  if model is not None and model != config.model_name:
    raise ApiError(404, f"model: {model!r} is not served here; use {config.model_name!r}", "model", "not_found_error")
  n = _field(body, "n", int, 1, 1, 1)
  del n
  echo = _field(body, "echo", bool, False)
  stream = _field(body, "stream", bool, False)
  k = engine.config.top_logprobs
  logprobs = _field(body, "logprobs", int, None, 0, k)
  max_tokens = _field(body, "max_tokens", int, 16, 0, config.max_tokens_limit)
  if max_tokens == 0 and not echo:
    raise ApiError(400, "max_tokens: must be >= 1 (0 only with echo=true, to score the prompt)", "max_tokens")
  temperature = _field(body, "temperature", float, 1.0, 0.0, 2.0)
  top_p = _field(body, "top_p", float, 1.0, 0.0, 1.0)
  if top_p <= 0:
    raise ApiError(400, "top_p: must be > 0", "top_p")
  top_k = _field(body, "top_k", int, 0, -1, engine.vocab_size)
  seed = _field(body, "seed", int, None, 0, 2**31 - 1)
  if stream and (logprobs is not None or echo):
    raise ApiError(400, "stream: logprobs and echo are not supported with stream=true", "stream")
  stop = body.get("stop")
  stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stop):
    raise ApiError(400, "stop: expected a non-empty string or a list of them (each at most 256 characters)", "stop")
  if len(stop) > config.max_stop:
    raise ApiError(400, f"stop: at most {config.max_stop} stop strings", "stop")
  prompts = _prompts(body["prompt"], tokenizer, engine.vocab_size)
  if len(prompts) > config.max_prompts:
    raise ApiError(400, f"prompt: {len(prompts)} prompts exceed this server's limit of {config.max_prompts} per "
                   "request", "prompt")
  requests = []
  for i, ids in enumerate(prompts):
    sampling = SamplingParams(temperature=temperature, top_k=max(top_k, 0), top_p=top_p,
                              seed=secrets.randbelow(2**31) if seed is None else (seed + i) % 2**31)
    req = Request(ids, max_tokens, sampling, tuple(stop), prompt_logprobs=echo and logprobs is not None)
    try:
      engine.check(req)
    except ValueError as e:
      msg = str(e)
      param = "max_tokens" if msg.startswith("max_new_tokens") else "prompt"
      raise ApiError(400, msg.replace("max_new_tokens", "max_tokens"), param) from None
    requests.append(req)
  return Parsed(requests, echo, logprobs, stream, prompts)


def _logprobs(tokenizer: Tokenizer, ids: list[int], lps: list, tops: list, k: int, offset0: int) -> dict:
  texts = [tokenizer.token_text(t) for t in ids]
  offsets, pos = [], offset0
  for t in texts:
    offsets.append(pos)
    pos += len(t)
  top = [None if alt is None else {tokenizer.token_text(a): float(lp) for a, lp in alt[:k]} for alt in tops]
  return {"tokens": texts, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}


def completion_response(parsed: Parsed, results: Sequence[Completion], tokenizer: Tokenizer, config: ServeConfig
                        ) -> dict:
  choices = []
  for i, (ids, res) in enumerate(zip(parsed.prompts, results)):
    prompt_text = tokenizer.decode(ids) if parsed.echo else ""
    choice = {"index": i, "text": prompt_text + (res.text or ""), "logprobs": None, "finish_reason": res.finish_reason}
    if parsed.logprobs is not None:
      k = parsed.logprobs
      lp = _logprobs(tokenizer, res.tokens, res.logprobs, res.top_logprobs, k, len(prompt_text))
      if parsed.echo:
        head = _logprobs(tokenizer, ids, res.prompt_logprobs, res.prompt_top_logprobs, k, 0)
        lp = {key: head[key] + lp[key] for key in lp}
      choice["logprobs"] = lp
    choices.append(choice)
  prompt_tokens = sum(len(p) for p in parsed.prompts)
  completion_tokens = sum(len(r.tokens) for r in results)
  return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
          "model": config.model_name, "choices": choices,
          "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}}


# ----------------------------------------------------------------------------------------------------------------
# ASGI: key and body-size guard, the app
# ----------------------------------------------------------------------------------------------------------------


class Guard:
  """ASGI middleware run before anything else: the API key (401), then the body size (413), then the app."""

  def __init__(self, app, api_key: str | None, max_body_bytes: int):
    self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    headers = dict(scope["headers"])
    if self.api_key is not None:
      got = headers.get(b"authorization", b"").decode("latin-1")
      if not hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
        err = ApiError(401, "Authorization: missing or wrong API key; send 'Authorization: Bearer <key>'",
                       "Authorization", "authentication_error")
        return await _send_json(send, 401, err.body())
    too_big = ApiError(413, f"request body: larger than this server's limit of {self.max_body_bytes} bytes", None)
    length = headers.get(b"content-length")
    if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
      return await _send_json(send, 413, too_big.body())
    body, more = b"", True
    while more:  # read (bounded) before the app sees it, also for chunked bodies without a length
      message = await receive()
      if message["type"] == "http.disconnect":
        return
      body += message.get("body", b"")
      more = message.get("more_body", False)
      if len(body) > self.max_body_bytes:
        return await _send_json(send, 413, too_big.body())
    replayed = False

    async def replay():
      nonlocal replayed
      if not replayed:
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}
      return await receive()

    return await self.app(scope, replay, send)


async def _send_json(send, status: int, payload: dict):
  data = json.dumps(payload).encode()
  await send({"type": "http.response.start", "status": status,
              "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
  await send({"type": "http.response.body", "body": data})


def create_app(engine: Engine, tokenizer: Tokenizer, config: ServeConfig = ServeConfig()):
  """The ASGI app (FastAPI behind the Guard middleware); starts the batching worker."""
  from fastapi import FastAPI
  from fastapi.responses import JSONResponse, StreamingResponse

  if engine.tokenizer is None:
    raise ValueError("create_app: the engine needs the tokenizer (Engine(..., tokenizer=...)) for text and stops")
  app = FastAPI(title="engram_jax", docs_url=None, redoc_url=None, openapi_url=None)
  batcher = Batcher(engine, wait_s=config.batch_wait_ms / 1000, max_pending=config.max_pending)
  app.state.batcher = batcher

  @app.exception_handler(ApiError)
  async def api_error(_, e: ApiError):
    return JSONResponse(e.body(), status_code=e.status)

  async def json_body(request: HttpRequest) -> Any:
    try:
      return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
      raise ApiError(400, f"request body: not valid JSON ({e})", None) from None

  @app.get("/health")
  async def health():
    return {"status": "ok", "batches": batcher.batches, "prompts": batcher.prompts, "pending": batcher.pending}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                        "owned_by": "engram_jax", "max_model_len": engine.config.max_len}]}

  @app.get("/tokenizer_info")
  async def tokenizer_info():
    eos = engine.config.eos_id
    return {"eos_token": None if eos is None else _piece(tokenizer, eos), "bos_token": None,
            "pad_token": _piece(tokenizer, engine.config.pad_id), "model_max_length": engine.config.max_len}

  @app.post("/tokenize")
  async def tokenize(request: HttpRequest):
    body = await json_body(request)
    text = body.get("prompt") if isinstance(body, dict) else None
    if not isinstance(text, str) or len(text) > config.max_body_bytes:
      raise ApiError(400, "prompt: expected a string", "prompt")
    eos = engine.config.eos_id
    ids = [eos] if eos is not None and text == _piece(tokenizer, eos) else tokenizer.encode(text)
    return {"tokens": ids, "count": len(ids), "max_model_len": engine.config.max_len}

  @app.post("/detokenize")
  async def detokenize(request: HttpRequest):
    body = await json_body(request)
    ids = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not all(isinstance(t, int) and 0 <= t < engine.vocab_size for t in ids):
      raise ApiError(400, f"tokens: expected a list of token ids in [0, {engine.vocab_size})", "tokens")
    return {"prompt": tokenizer.decode(ids)}

  @app.post("/v1/completions")
  async def completions(request: HttpRequest):
    parsed = parse_completion(await json_body(request), engine, tokenizer, config)
    if parsed.stream:
      return StreamingResponse(_stream(batcher, parsed, config), media_type="text/event-stream")
    results = await asyncio.wrap_future(batcher.submit(parsed.requests))
    return completion_response(parsed, results, tokenizer, config)

  return Guard(app, config.api_key, config.max_body_bytes)


def _piece(tokenizer: Tokenizer, token_id: int) -> str:
  sp = getattr(tokenizer, "sp", None)
  return sp.id_to_piece(token_id) if sp is not None else tokenizer.token_text(token_id)


async def _stream(batcher: Batcher, parsed: Parsed, config: ServeConfig):
  """Server-sent events: one chunk per emitted piece of text, a final chunk per prompt, then [DONE]."""
  loop = asyncio.get_running_loop()
  events: asyncio.Queue = asyncio.Queue()
  cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

  def chunk(index, text, finish):
    return {"id": cid, "object": "text_completion", "created": created, "model": config.model_name,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}

  future = batcher.submit(parsed.requests, lambda k, tok, text: loop.call_soon_threadsafe(
      events.put_nowait, chunk(k, text, None)))
  future.add_done_callback(lambda f: loop.call_soon_threadsafe(events.put_nowait, None))
  while True:
    event = await events.get()
    if event is None:
      break
    if event["choices"][0]["text"]:
      yield f"data: {json.dumps(event)}\n\n"
  try:
    results = future.result()
  except Exception as e:  # headers are sent: report in-band
    yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
  else:
    for i, res in enumerate(results):
      yield f"data: {json.dumps(chunk(i, '', res.finish_reason))}\n\n"
  yield "data: [DONE]\n\n"


def run(engine: Engine, tokenizer: Tokenizer, config: ServeConfig = ServeConfig(), *, warmup: bool = True) -> None:
  """Compiles the engine's steps (one short request), then serves until interrupted."""
  import uvicorn

  if warmup:
    t0 = time.perf_counter()
    engine.generate([Request([engine.config.pad_id], 2)])
    log.info("compiled the prefill and decode steps in %.1f s", time.perf_counter() - t0)
  app = create_app(engine, tokenizer, config)
  print(f"serving {config.model_name!r} on http://{config.host}:{config.port}/v1 "
        f"(batch {engine.config.batch_size}, context {engine.config.max_len}, tables {engine.placement}, "
        f"API key {'required' if config.api_key else 'off'})", flush=True)
  uvicorn.run(app, host=config.host, port=config.port, log_level="info", limit_concurrency=config.max_connections,
              timeout_keep_alive=5)


def main(argv: Sequence[str] | None = None) -> None:
  import argparse
  import os
  import sys

  from engram_jax import cli, generate  # the one CLI layer and the engine loader

  (checkpoint_path, decode_config, context, mesh, row_counts, server), rest = generate.resolve(
      sys.argv[1:] if argv is None else argv, cli.SERVE)
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--host", default=server.host, help="interface to bind (default loopback only)")
  p.add_argument("--port", type=int, default=server.port)
  p.add_argument("--model_name", default=None, help="name reported by /v1/models (default: the run directory's)")
  args = p.parse_args(rest)
  key = server.api_key or os.environ.get("ENGRAM_API_KEY") or None
  logging.basicConfig(level=logging.INFO)
  engine, tokenizer, record = generate.load_engine(checkpoint_path, decode_config, context, mesh, row_counts)
  name = args.model_name or os.path.basename(os.path.normpath(str(record.model_dir)))
  run(engine, tokenizer, dataclasses.replace(server, host=args.host, port=args.port, api_key=key, model_name=name))


if __name__ == "__main__":  # run the importable module's main, so gin sees a single copy of the configurables
  from engram_jax import serve as _entry
  _entry.main()
