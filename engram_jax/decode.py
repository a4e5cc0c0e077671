"""Generation for Decoder models: ragged prompts in fixed-shape batches, chunked prefill, one jitted decode step per
token (KV cache + Engram caches), greedy / temperature / top-k / top-p sampling with per-row seeds, stop on EOS or
stop strings, prompt log-probabilities (echo scoring), Engram tables on the device or in host memory.

Fixed shapes (no recompilation per token or per prompt): an Engine runs B = DecodeConfig.batch_size rows (requests
are grouped, the last group padded with idle rows) against a KV cache of DecodeConfig.max_len slots; prompts are
left-padded (masked) to a multiple of prefill_chunk and fed one chunk per call. Compilations per engine: one
prefill-chunk step and one decode step; with host tables the decode step is split before each Engram layer (one
compilation per part) and the hot-row cache adds one small assembly per miss bucket (powers of two).

Host-resident tables (table_placement='host'): per step the new tokens are hashed on the host (with each row's
n-gram history), their rows gathered from numpy tables (misses only, with a hot-row cache) and sent to the device
while it runs the blocks before the first Engram layer (the part is dispatched first; JAX dispatch is asynchronous).
Prefill chunks get their rows from a background thread one chunk ahead. Device-resident decoding dispatches step
t+1 before reading step t's tokens, so the host's bookkeeping never stalls the device.

Letters: B batch rows, P padded prompt length, C prefill chunk, T tokens per call (C or 1), V vocabulary,
K top log-probs per position, H hash heads, d row width, L layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from engram_jax import host_table, sharding
from engram_jax.layers.engram import EngramTable

PLACEMENTS = ("device", "host")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """How an Engine batches and places things (not what it samples: see SamplingParams)."""

  batch_size: int = 8  # B: rows per compiled step; requests are grouped into batches of B (the last one padded).
  max_len: int = 512  # KV-cache slots per row: padded prompt + generated tokens must fit (the context limit).
  prefill_chunk: int = 32  # C: prompts are left-padded to a multiple of C and prefilled C tokens per call.
  top_logprobs: int = 5  # K: most likely alternatives returned per position (OpenAI's limit for `logprobs`).
  eos_id: int | None = 1  # A row stops after sampling this id (not part of its output); None: never.
  pad_id: int = 0  # Id fed at left-padding positions (masked out, so any id in the vocabulary works).
  table_placement: str | None = None  # 'device' | 'host' for the Engram tables; None: the model's EngramConfig.
  hot_rows: int = 0  # Host tables: rows per Engram layer cached on the device (needs row counts); 0 = no cache.

  def __post_init__(self):
    for name in ("batch_size", "max_len", "prefill_chunk", "top_logprobs"):
      if getattr(self, name) < 1:
        raise ValueError(f"DecodeConfig.{name}={getattr(self, name)} must be >= 1")
    if self.prefill_chunk > self.max_len:
      raise ValueError(f"DecodeConfig.prefill_chunk={self.prefill_chunk} must be <= max_len={self.max_len}")
    if self.table_placement not in (None,) + PLACEMENTS:
      raise ValueError(f"DecodeConfig.table_placement={self.table_placement!r}; use one of {PLACEMENTS} or None")
    if self.hot_rows < 0:
      raise ValueError(f"DecodeConfig.hot_rows={self.hot_rows} must be >= 0")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request's tokens are drawn."""

  temperature: float = 0.0  # 0 = greedy (argmax of the logits); else logits / temperature.
  top_k: int = 0  # Keep only the k most likely tokens (0 = all).
  top_p: float = 1.0  # Nucleus: the smallest set of most likely tokens whose probability reaches top_p.
  seed: int = 0  # Token i of the row is drawn with fold_in(PRNGKey(seed), i): reproducible whatever the batch.

  def __post_init__(self):
    if not (self.temperature >= 0 and math.isfinite(self.temperature)):
      raise ValueError(f"temperature={self.temperature} must be a finite number >= 0 (0 = greedy)")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = no top-k filter)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p} must lie in (0, 1]")
    if not 0 <= self.seed < 2**31:
      raise ValueError(f"seed={self.seed} must lie in [0, 2^31)")


@dataclasses.dataclass
class Request:
  """One prompt to continue."""

  prompt: Sequence[int]  # Raw token ids (at least one).
  max_new_tokens: int  # Tokens to generate at most (0: only score the prompt).
  sampling: SamplingParams = SamplingParams()
  stop: tuple[str, ...] = ()  # Stop strings (need the engine's tokenizer); the text ends before the first match.
  prompt_logprobs: bool = False  # Also return log p(prompt token i | tokens < i) and the top alternatives.


@dataclasses.dataclass
class Completion:
  """What a request produced."""

  tokens: list[int]  # Generated ids; a drawn EOS is the last one (not in `text`); ends at a stop string's token.
  logprobs: list[float]  # log p(token) under the model (temperature 1), one per generated token.
  top_logprobs: list[list[tuple[int, float]]]  # K most likely (id, log p) at each generated position.
  finish_reason: str  # 'stop' (EOS or a stop string) or 'length' (max_new_tokens reached).
  text: str | None = None  # Decoded continuation (with a tokenizer), cut before a stop string.
  prompt_logprobs: list[float | None] | None = None  # [len(prompt)], None for the first token.
  prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None


class Tokenizer:
  """What the engine needs from a tokenizer (see SentencePieceTokenizer)."""

  vocab_size: int
  eos_id: int | None

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    raise NotImplementedError

  def token_text(self, token_id: int) -> str:
    raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model file (the run directory's tokenizer)."""

  def __init__(self, path: str):
    import sentencepiece as spm  # lazy: only text front-ends need it
    self.sp = spm.SentencePieceProcessor(model_file=str(path))
    self.vocab_size = self.sp.get_piece_size()
    self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
    self.path = str(path)

  def encode(self, text: str) -> list[int]:
    return list(self.sp.encode(text))

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.decode([int(i) for i in ids])

  def token_text(self, token_id: int) -> str:
    """The text a single token stands for (a leading '\u2581' is a space; byte pieces become their character)."""
    from engram_jax.hashing import decode_piece
    return decode_piece(self.sp.id_to_piece(int(token_id)))


# ----------------------------------------------------------------------------------------------------------------
# Sampling (pure functions)
# ----------------------------------------------------------------------------------------------------------------


class RowState(NamedTuple):
  """Per-row decoding state on the device (all [B])."""

  token: jax.Array  # int32: the token fed next (the last one sampled)
  pos: jax.Array  # int32: its position (the row's real length so far)
  step: jax.Array  # int32: tokens sampled so far (the index of the next draw)
  seed: jax.Array  # int32: the row's seed
  temperature: jax.Array  # float32, 0 = greedy
  top_k: jax.Array  # int32, 0 = off
  top_p: jax.Array  # float32


def mask_vocab(logits: jax.Array, valid: int | None) -> jax.Array:
  """-inf at ids >= valid (a model vocabulary larger than its tokenizer's: ids no text stands for)."""
  if valid is None or valid >= logits.shape[-1]:
    return logits
  return jnp.where(jnp.arange(logits.shape[-1]) < valid, logits, -jnp.inf)


def sample_tokens(logits: jax.Array, state: RowState) -> jax.Array:
  """logits [B, V] float32 -> token ids [B]: argmax where temperature == 0, else a draw from softmax(logits / T)
  restricted to the top_k most likely tokens, then to the top_p nucleus (renormalised after top-k), with the key
  fold_in(PRNGKey(seed), step) of each row."""
  v = logits.shape[-1]
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
  scaled = logits / jnp.maximum(state.temperature, 1e-6)[:, None]  # [B, V]
  order = jnp.argsort(-scaled, axis=-1)  # [B, V] most likely first
  ranked = jnp.take_along_axis(scaled, order, axis=-1)  # [B, V]
  rank = jnp.arange(v, dtype=jnp.int32)[None, :]
  keep = (state.top_k[:, None] <= 0) | (rank < state.top_k[:, None])  # [B, V]
  probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
  keep &= (before < state.top_p[:, None]) | (rank == 0)
  keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.PRNGKey(s), i))(state.seed, state.step)  # [B, 2]
  choice = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, ranked, -jnp.inf))  # [B]
  drawn = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jnp.where(state.temperature > 0, drawn, greedy)


def token_logprobs(logits: jax.Array, tokens: jax.Array, k: int, valid: int | None = None) -> dict[str, jax.Array]:
  """logits [..., V], tokens [...] -> {'logprob' [...], 'top_ids' [..., K], 'top_logprobs' [..., K]} (float32):
  the model's log-probabilities; alternatives only among ids < valid (None: all)."""
  lsm = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  lp = jnp.take_along_axis(lsm, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
  top_lp, top_ids = jax.lax.top_k(mask_vocab(lsm, valid), k)
  return {"logprob": lp, "top_ids": top_ids.astype(jnp.int32), "top_logprobs": top_lp}


# ----------------------------------------------------------------------------------------------------------------
# Text: incremental detokenisation and stop strings
# ----------------------------------------------------------------------------------------------------------------


class _RowText:
  """A row's continuation text, decoded with a few prompt tokens of context (so a leading space survives).

  Streaming holds back a trailing incomplete character (U+FFFD) and any tail that could begin a stop string, so no
  emitted text is ever taken back; `flush` releases the rest when the row ends.
  """

  CONTEXT = 8

  def __init__(self, tokenizer: Tokenizer, prompt: Sequence[int], stop: Sequence[str]):
    self.tok = tokenizer
    self.context = list(prompt[-self.CONTEXT:])
    self.prefix = tokenizer.decode(self.context)
    self.stop = tuple(stop)
    self.ids: list[int] = []
    self.full = ""  # the continuation so far (cut before a stop string)
    self.text = ""  # emitted so far (a prefix of full)

  def push(self, token: int) -> tuple[str, bool]:
    """Adds a token; returns (newly emitted text, hit a stop string)."""
    self.ids.append(int(token))
    full = self.tok.decode(self.context + self.ids)
    full = full[len(self.prefix):] if full.startswith(self.prefix) else self.tok.decode(self.ids)
    hits = [j for j in (full.find(s) for s in self.stop) if j >= 0]
    if hits:
      self.full = full[:min(hits)]
      return self.flush(), True
    self.full = full
    safe = full.rstrip("\ufffd")
    hold = max([k for s in self.stop for k in range(1, len(s)) if safe.endswith(s[:k])], default=0)
    safe = safe[:len(safe) - hold]
    return self._emit(safe), False

  def flush(self) -> str:
    """Emits everything not yet emitted (the row has ended)."""
    return self._emit(self.full)

  def _emit(self, upto: str) -> str:
    if not upto.startswith(self.text) or len(upto) <= len(self.text):
      return ""
    delta, self.text = upto[len(self.text):], upto
    return delta


# ----------------------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------------------


def _split_tables(model: nnx.Module):
  """(graphdef, table state, rest) of a model: the Engram tables apart from every other variable."""
  return nnx.split(model, EngramTable, ...)


def host_layers(model, counts: Mapping[int, np.ndarray] | None = None, hot_rows: int = 0,
                cache_sharding=None) -> dict[int, host_table.HostLayer]:
  """Copies each Engram layer's table into host memory (numpy); with counts and hot_rows > 0 also builds a
  device-resident cache of its most frequent rows."""
  out = {}
  for i, block in enumerate(model.blocks):
    if block.engram is None:
      continue
    table = host_table.HostTable(np.asarray(jax.device_get(block.engram.table[...])))
    cache = None
    if hot_rows:
      if counts is None or i not in counts:
        raise ValueError(f"DecodeConfig.hot_rows={hot_rows} needs row counts for Engram layer {i} "
                         "(host_table.count_rows over the training corpus, or load_row_counts)")
      cache = host_table.HotRowCache(table, counts[i], hot_rows, sharding=cache_sharding)
    out[i] = host_table.HostLayer(host_table.HostHasher.from_engram(block.engram), table, cache)
  return out


def _placement(model, config: DecodeConfig) -> str:
  if config.table_placement is not None:
    return config.table_placement
  engram = model.config.engram
  return "device" if engram is None or not model.config.engram_layers else engram.table_placement


class Engine:
  """Compiled prefill and decode steps for one model and DecodeConfig; `generate(requests)` runs them.

  model: a Decoder (on `mesh` if given: batch rows over the data axes, tables as the model's sharding has them).
  tokenizer: needed for stop strings and `Completion.text`; ids past its vocabulary are never sampled.
  row_counts: {layer: counts [V]} for the hot-row cache.
  """

  def __init__(self, model, config: DecodeConfig = DecodeConfig(), *, mesh: Mesh | None = None,
               tokenizer: Tokenizer | None = None, row_counts: Mapping[int, np.ndarray] | None = None,
               sync_timing: bool = False):
    self.model, self.config, self.mesh, self.tokenizer = model, config, mesh, tokenizer
    c = config
    self.num_layers = len(model.blocks)
    self.vocab_size = model.config.vocab_size
    # Ids a tokenizer can turn into text; a model vocabulary may be larger (padded): those ids are never sampled.
    self.sample_vocab = self.vocab_size if tokenizer is None else min(self.vocab_size, tokenizer.vocab_size)
    if c.top_logprobs > self.vocab_size:
      raise ValueError(f"DecodeConfig.top_logprobs={c.top_logprobs} exceeds the vocabulary ({self.vocab_size})")
    if c.eos_id is not None and not 0 <= c.eos_id < self.vocab_size:
      raise ValueError(f"DecodeConfig.eos_id={c.eos_id} is outside the vocabulary [0, {self.vocab_size})")
    if not 0 <= c.pad_id < self.vocab_size:
      raise ValueError(f"DecodeConfig.pad_id={c.pad_id} is outside the vocabulary [0, {self.vocab_size})")
    self.replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    if mesh is not None:
      n = math.prod(mesh.shape[a] for a in sharding.mesh_axes("batch"))
      if c.batch_size % n:
        raise ValueError(f"DecodeConfig.batch_size={c.batch_size} must be a multiple of the mesh's {n} "
                         "data-parallel devices (data x expert axes)")
    self.placement = _placement(model, c)
    engram_layers = sorted(i for i, b in enumerate(model.blocks) if b.engram is not None)
    if c.hot_rows and self.placement != "host":
      raise ValueError("DecodeConfig.hot_rows > 0 needs host tables: set table_placement='host'")
    graphdef, tables, rest = _split_tables(model)
    self.host_rows = None
    if self.placement == "host" and engram_layers:
      layers = host_layers(model, row_counts, c.hot_rows, self.replicated)
      self.host_rows = host_table.HostRows(layers, mesh=mesh, sync_timing=sync_timing)
      # The compiled steps never read a table: give them empty ones (the device keeps no copy in these steps).
      tables = jax.tree.map(lambda t: jnp.zeros((0,) + t.shape[1:], t.dtype), tables)
    # The compiled steps take the parameters as a flat list of arrays: jit flattens a list in C++, where nnx.State
    # pytrees cost ~0.15 ms of Python per call (measured on CPU), on every decode step's dispatch.
    self.param_leaves, self.param_treedef = jax.tree.flatten((tables, rest))
    self.graphdef = graphdef
    # Host tables: the step is split before each Engram layer after block 0, so rows for that layer can be
    # gathered and sent while the blocks before it run.
    cuts = [0] + [l for l in engram_layers if l > 0] + [self.num_layers] if self.host_rows else [0, self.num_layers]
    self.parts = list(zip(cuts[:-1], cuts[1:]))
    self._prefill = jax.jit(self._prefill_fn, donate_argnums=(1,))
    self._decode = {p: jax.jit(functools.partial(self._decode_fn, start=p[0], stop=p[1]), donate_argnums=(1,))
                    for p in self.parts}
    self._cache_fn = None
    # host_wait_s: decode time the host spent waiting for the previous draw; host_critical_s: from that draw to the
    # dispatch of the step's last part (hash, gather, send, dispatch), when the device may idle (host tables only).
    self.stats = {"prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0, "generated_tokens": 0, "prompt_tokens": 0,
                  "host_wait_s": 0.0, "host_critical_s": 0.0}

  # -- compiled functions ----------------------------------------------------------------------------------------

  @property
  def params(self):
    """(table state, other state) the compiled steps run with (tables are empty [0, d] with host tables)."""
    return jax.tree.unflatten(self.param_treedef, self.param_leaves)

  def _merge(self, leaves):
    return nnx.merge(self.graphdef, *jax.tree.unflatten(self.param_treedef, leaves), copy=True)

  def _prefill_fn(self, params, cache, tokens, segment_ids, positions, next_tokens, state, rows):
    """One prompt chunk [B, C]: cache', log p of each next prompt token (+ top K), and the draw from the chunk's
    last position (the row's first new token when this is the prompt's last chunk)."""
    model = self._merge(params)
    logits, cache = model.decode_step(tokens, cache, positions=positions, engram_rows=rows, segment_ids=segment_ids)
    k, n = self.config.top_logprobs, self.sample_vocab
    prompt = token_logprobs(logits, next_tokens, k, n)  # [B, C], [B, C, K]
    last = logits[:, -1]  # [B, V]
    token = sample_tokens(mask_vocab(last, n), state)
    return cache, prompt, {"token": token, **token_logprobs(last, token, k, n)}

  def _decode_fn(self, params, cache, state, h, rows, *, start, stop):
    """Blocks [start, stop) of one decode step for state.token; the last part samples and advances the state."""
    model = self._merge(params)
    out, cache = model.decode_part(state.token[:, None], cache, start, stop, h=h, positions=state.pos[:, None],
                                   engram_rows=rows)
    if stop < self.num_layers:
      return cache, out
    last = out[:, 0]  # [B, V]
    k, n = self.config.top_logprobs, self.sample_vocab
    token = sample_tokens(mask_vocab(last, n), state)
    new_state = state._replace(token=token, pos=state.pos + 1, step=state.step + 1)
    return cache, new_state, {"token": token, **token_logprobs(last, token, k, n)}

  def _sharding(self, ndim: int):
    return None if self.mesh is None else sharding.batch_sharding(self.mesh, ndim)

  def _put(self, x):
    """Host array [B, ...] -> device, batch-sharded on a mesh."""
    x = np.asarray(x)
    return jax.device_put(x, self._sharding(x.ndim))

  def _init_cache(self):
    """A fresh decode cache (distinct buffers, so it can be donated), batch-sharded on a mesh."""
    if self._cache_fn is None:
      fn = functools.partial(self.model.init_cache, self.config.batch_size, self.config.max_len)
      out = None if self.mesh is None else jax.tree.map(
          lambda x: self.replicated if x.ndim == 0 else self._sharding(x.ndim), jax.eval_shape(fn))
      self._cache_fn = jax.jit(fn, out_shardings=out)
    return self._cache_fn()

  # -- host loop -------------------------------------------------------------------------------------------------

  def check(self, request: Request) -> None:
    """Raises ValueError (naming the field) for a request this engine cannot run."""
    prompt = np.asarray(request.prompt)
    if prompt.ndim != 1 or prompt.size == 0:
      raise ValueError("prompt: must hold at least one token id")
    if not np.issubdtype(prompt.dtype, np.integer) or prompt.min() < 0 or prompt.max() >= self.vocab_size:
      raise ValueError(f"prompt: token ids must be integers in [0, {self.vocab_size})")
    if request.max_new_tokens < 0:
      raise ValueError(f"max_new_tokens={request.max_new_tokens} must be >= 0")
    padded = self.padded_len(prompt.size)
    if padded + request.max_new_tokens > self.config.max_len:
      raise ValueError(f"prompt + max_new_tokens: {prompt.size} prompt tokens (padded to {padded}) + "
                       f"{request.max_new_tokens} new tokens exceed the context of {self.config.max_len} tokens")
    if request.stop and self.tokenizer is None:
      raise ValueError("stop: stop strings need a tokenizer (Engine(..., tokenizer=...))")

  def padded_len(self, n: int) -> int:
    c = self.config.prefill_chunk
    return -(-n // c) * c

  def groups(self, requests: Sequence[Request]) -> list[list[int]]:
    """Request indices in batches of at most B whose padded prompt + max_new_tokens fit the cache together."""
    out, cur, p, m = [], [], 0, 0
    for i, r in enumerate(requests):
      p2, m2 = max(p, self.padded_len(len(r.prompt))), max(m, r.max_new_tokens)
      if cur and (len(cur) == self.config.batch_size or p2 + m2 > self.config.max_len):
        out.append(cur)
        cur, p2, m2 = [], self.padded_len(len(r.prompt)), r.max_new_tokens
      cur.append(i)
      p, m = p2, m2
    if cur:
      out.append(cur)
    return out

  def generate(self, requests: Sequence[Request],
               on_token: Callable[[int, int, str], None] | None = None) -> list[Completion]:
    """Runs every request (in batches of B); on_token(request index, token id, new text) streams each token."""
    for r in requests:
      self.check(r)
    results: list[Completion | None] = [None] * len(requests)
    for group in self.groups(requests):
      stream = None if on_token is None else (lambda row, tok, text, g=group: on_token(g[row], tok, text))
      for i, res in zip(group, self._run_batch([requests[i] for i in group], stream)):
        results[i] = res
    return results

  def _run_batch(self, reqs: list[Request], on_token) -> list[Completion]:
    c, b = self.config, self.config.batch_size
    n = len(reqs)
    lens = np.array([len(r.prompt) for r in reqs])
    p = self.padded_len(int(lens.max()))
    tokens = np.full((b, p), c.pad_id, np.int32)
    seg = np.zeros((b, p), np.int32)
    pos = np.zeros((b, p), np.int32)
    for i, r in enumerate(reqs):
      tokens[i, p - lens[i]:] = r.prompt
      seg[i, p - lens[i]:] = 1
      pos[i, p - lens[i]:] = np.arange(lens[i])
    next_tokens = np.concatenate([tokens[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
    pad_rows = [SamplingParams()] * (b - n)
    sp = [r.sampling for r in reqs] + pad_rows
    state = RowState(
        token=self._put(np.zeros(b, np.int32)), pos=self._put(np.concatenate([lens, np.zeros(b - n)]).astype(np.int32)),
        step=self._put(np.zeros(b, np.int32)), seed=self._put(np.array([s.seed for s in sp], np.int32)),
        temperature=self._put(np.array([s.temperature for s in sp], np.float32)),
        top_k=self._put(np.array([s.top_k for s in sp], np.int32)),
        top_p=self._put(np.array([s.top_p for s in sp], np.float32)))
    cache = self._init_cache()

    # --- prefill, chunk by chunk (host rows one chunk ahead on a background thread)
    t0 = time.perf_counter()
    chunks = [slice(s, s + c.prefill_chunk) for s in range(0, p, c.prefill_chunk)]
    if self.host_rows is not None:
      self.host_rows.reset(b)
      rows_iter = host_table.prefetch(lambda sl: self.host_rows(tokens[:, sl], seg[:, sl] != 0), chunks)
    else:
      rows_iter = (None for _ in chunks)
    prompt_outs = []
    for sl, rows in zip(chunks, rows_iter):
      cache, prompt, first = self._prefill(self.param_leaves, cache, self._put(tokens[:, sl]), self._put(seg[:, sl]),
                                           self._put(pos[:, sl]), self._put(next_tokens[:, sl]), state, rows)
      prompt_outs.append(prompt)
    state = state._replace(token=first["token"], step=state.step + 1)
    want_prompt = any(r.prompt_logprobs for r in reqs)
    prompt_np = jax.device_get(prompt_outs) if want_prompt else None
    self.stats["prefill_s"] += time.perf_counter() - t0
    self.stats["prompt_tokens"] += int(lens.sum())

    # --- decode
    t0 = time.perf_counter()
    rows_out = [dict(tokens=[], logprobs=[], top=[], finish=None) for _ in range(n)]
    texts = [_RowText(self.tokenizer, r.prompt, r.stop) if self.tokenizer is not None else None for r in reqs]
    for i, r in enumerate(reqs):
      if r.max_new_tokens == 0:
        rows_out[i]["finish"] = "length"

    def consume(out) -> bool:
      """Host bookkeeping of one step's draws; True when every row has finished."""
      out = jax.device_get(out)
      for i, r in enumerate(reqs):
        row = rows_out[i]
        if row["finish"] is not None:
          continue
        tok = int(out["token"][i])
        row["tokens"].append(tok)
        row["logprobs"].append(float(out["logprob"][i]))
        row["top"].append(list(zip(out["top_ids"][i].tolist(), out["top_logprobs"][i].tolist())))
        if c.eos_id is not None and tok == c.eos_id:
          row["finish"] = "stop"
          if texts[i] is not None and on_token is not None and (delta := texts[i].flush()):
            on_token(i, tok, delta)
          continue
        delta, stopped = texts[i].push(tok) if texts[i] is not None else ("", False)
        if stopped:
          row["finish"] = "stop"
        elif len(row["tokens"]) >= r.max_new_tokens:
          row["finish"] = "length"
          delta += texts[i].flush() if texts[i] is not None else ""
        if on_token is not None and (delta or texts[i] is None):
          on_token(i, tok, delta)
      return all(row["finish"] is not None for row in rows_out)

    max_new = max(r.max_new_tokens for r in reqs)
    pending, steps = first, 0
    done = max_new == 0
    while not done:
      if steps + 1 >= max_new:  # the pending draw is the last one any row may take
        done = consume(pending)
        break
      if self.host_rows is None:
        cache, state, nxt = self._decode[self.parts[0]](self.param_leaves, cache, state, None, None)
        done = consume(pending)  # overlaps with the step just dispatched
      else:
        cache, state, nxt, done = self._host_step(cache, state, pending, consume)
      pending, steps = nxt, steps + 1
    self.stats["decode_s"] += time.perf_counter() - t0
    self.stats["decode_steps"] += steps
    jax.block_until_ready(cache)

    results = []
    for i, r in enumerate(reqs):
      row = rows_out[i]
      res = Completion(tokens=row["tokens"], logprobs=row["logprobs"], top_logprobs=row["top"],
                       finish_reason=row["finish"] or "length",
                       text=texts[i].full if texts[i] is not None else None)
      self.stats["generated_tokens"] += len(row["tokens"])
      if r.prompt_logprobs:
        lp = np.concatenate([o["logprob"][i] for o in prompt_np])  # [P]: log p(token j+1 | <= j)
        ids = np.concatenate([o["top_ids"][i] for o in prompt_np])
        tlp = np.concatenate([o["top_logprobs"][i] for o in prompt_np])
        start = p - lens[i]
        res.prompt_logprobs = [None] + [float(x) for x in lp[start:p - 1]]
        res.prompt_top_logprobs = [None] + [list(zip(ids[j].tolist(), tlp[j].tolist())) for j in range(start, p - 1)]
      results.append(res)
    return results

  def _host_step(self, cache, state, pending, consume):
    """One decode step with host tables: dispatch the blocks before the first Engram layer, read the previous
    draw (the tokens to hash), gather and send their rows, dispatch the rest; only then do the previous step's
    bookkeeping (it overlaps with the device's work on this step)."""
    h = None
    engram0 = 0 in self.host_rows.layers
    if not engram0:  # blocks before the first Engram layer run while the host works
      cache, h = self._decode[self.parts[0]](self.param_leaves, cache, state, None, None)
    t0 = time.perf_counter()
    tokens = np.asarray(pending["token"])[:, None]  # [B, 1]; waits for the previous step
    t1 = time.perf_counter()
    rows = self.host_rows(tokens)
    for start, stop in self.parts[0 if engram0 else 1:]:
      part_rows = {l: r for l, r in rows.items() if start <= l < stop}
      if stop < self.num_layers:
        cache, h = self._decode[(start, stop)](self.param_leaves, cache, state, h, part_rows)
      else:
        cache, state, out = self._decode[(start, stop)](self.param_leaves, cache, state, h, part_rows)
    self.stats["host_wait_s"] += t1 - t0
    self.stats["host_critical_s"] += time.perf_counter() - t1
    return cache, state, out, consume(pending)


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
             config: DecodeConfig | None = None, mesh: Mesh | None = None, tokenizer: Tokenizer | None = None,
             stop: Sequence[str] = (), row_counts: Mapping[int, np.ndarray] | None = None,
             on_token: Callable[[int, int, str], None] | None = None) -> list[Completion]:
  """Continues each prompt (raw token ids) by up to max_new_tokens tokens; see Engine for the options.

  config None: batch_size = len(prompts) (rounded up to the mesh's data-parallel size) and the smallest max_len
  that fits. Builds (and compiles) a new Engine per call: hold an Engine to generate repeatedly.
  """
  if not prompts:
    return []
  samplings = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
  if len(samplings) != len(prompts):
    raise ValueError(f"sampling: {len(samplings)} SamplingParams for {len(prompts)} prompts")
  if config is None:
    n = 1 if mesh is None else math.prod(mesh.shape[a] for a in sharding.mesh_axes("batch"))
    chunk = DecodeConfig.prefill_chunk
    longest = -(-max(len(p) for p in prompts) // chunk) * chunk
    config = DecodeConfig(batch_size=-(-len(prompts) // n) * n, max_len=longest + max(max_new_tokens, 1))
  engine = Engine(model, config, mesh=mesh, tokenizer=tokenizer, row_counts=row_counts)
  requests = [Request(list(p), max_new_tokens, s, tuple(stop)) for p, s in zip(prompts, samplings)]
  return engine.generate(requests, on_token)


def engine_summary(engine: Engine) -> dict[str, Any]:
  """Throughput and host-table statistics of an engine so far."""
  s = dict(engine.stats)
  s["decode_tokens_per_s"] = s["generated_tokens"] / max(s["decode_s"], 1e-9)
  if engine.host_rows is not None:
    s["host"] = engine.host_rows.times.as_dict()
    s["hit_rates"] = engine.host_rows.hit_rates()
  return s
