"""Tokenizer compression and multi-head n-gram hashing for Engram (arXiv 2601.07372, section 2.2).

ONE specification, two bit-identical implementations: `hash_ngrams_np` (host / input pipeline) and
`hash_ngrams_jnp` (in-graph). No TensorFlow, no tokenizer at hashing time: the compression map is a plain
int32 array that can be saved with a run (`save_compression`).

The hash (per Engram layer l, for compressed ids x'):
  * suffix n-grams of orders n = 2..N: g_{t,n} = (x'_{t-n+1}, ..., x'_t); a position before the sequence start
    or before the start of the token's document (segment ids of a packed row) reads the compressed pad id;
  * mix_{t,n} = XOR_{i<n} (x'_{t-i} * m_i) with per-layer odd multipliers m_i = 2 r_i + 1, r_i drawn by
    numpy's default_rng(seed + 10007 * l);
  * head k of order n reads row  mix_{t,n} mod p_{n,k}  of its own table; the primes p_{n,k} are the next
    unused primes at or above the configured base size, unique across heads, orders and layers.

Integer width (`hash_bits`):
  * 32 (default): all arithmetic in uint32. The products x' * m_i wrap modulo 2^32 -- a defined, documented
    part of the hash (numpy and XLA both wrap uint32 multiplication), not an overflow. r_i < 2^31, so m_i < 2^32.
    Runs on TPU without x64.
  * 64: the demo's int64 hashing bit-for-bit: r_i < floor(int64max / V') // 2 (V' = compressed vocab size), so
    every product x' * m_i < int64max and never wraps; mix >= 0. The jnp path needs jax x64 enabled.

Letters: B batch, S sequence, N max n-gram order, K heads per order, H = (N - 1) * K hash heads,
V raw vocabulary size, V' compressed vocabulary size.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

LAYER_SEED_STRIDE = 10007  # Demo convention: the multipliers of layer l come from seed + 10007 * l.
_SPACE_RUN = re.compile(r"[ \t\r\n]+")
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SP_SPACE = "\u2581"  # SentencePiece's marker for a leading space.


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer compression
# ----------------------------------------------------------------------------------------------------------------


# White_Space (Unicode property): what the demo's normalizer strips. Python's str.strip() would also strip the
# information separators U+001C..U+001F, which the demo keeps.
_WHITE_SPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
                         "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
# The demo protects a lone space with this private-use character (and so also turns any U+E000 into a space).
_SENTINEL = "\ue000"


def _strip_white_space(s: str) -> str:
  lo, hi = 0, len(s)
  while lo < hi and s[lo] in _WHITE_SPACE:
    lo += 1
  while hi > lo and s[hi - 1] in _WHITE_SPACE:
    hi -= 1
  return s[lo:hi]


def normalize_text(text: str) -> str:
  """The demo's normalizer, step for step: NFKC, NFD, drop combining marks (categories Mn, Mc, Me), lowercase each
  character (no final-sigma rule), collapse [ \t\r\n]+ to one space, keep a lone space, strip White_Space."""
  s = unicodedata.normalize("NFKC", text)
  s = unicodedata.normalize("NFD", s)
  s = "".join(c for c in s if not unicodedata.category(c).startswith("M"))
  s = "".join(c.lower() for c in s)  # per character: 'ΟΣ' -> 'οσ' (str.lower() would give 'ος')
  s = _SPACE_RUN.sub(" ", s)
  if s == " ":
    s = _SENTINEL
  return _strip_white_space(s).replace(_SENTINEL, " ")


def decode_piece(piece: str) -> str:
  """Text of one vocabulary piece: SentencePiece '\u2581' -> space; byte pieces '<0xNN>' -> that byte (U+FFFD if
  it is not a whole UTF-8 character, like a tokenizer's single-token decode)."""
  m = _BYTE_PIECE.match(piece)
  if m:
    return bytes([int(m.group(1), 16)]).decode("utf-8", errors="replace")
  return piece.replace(_SP_SPACE, " ")


def compression_key_from_text(text: str, piece: str) -> str:
  """The key two ids must share to be merged (demo rule): `text` is the id's single-id decode, `piece` its raw
  token string. Text containing U+FFFD (a partial UTF-8 character) keeps the raw piece; an empty normal form
  keeps the decoded text."""
  if "\ufffd" in text:
    return piece
  norm = normalize_text(text)
  return norm if norm else text


def compression_key(piece: str) -> str:
  """The key of a piece string on the piece path (its text read by `decode_piece`)."""
  return compression_key_from_text(decode_piece(piece), piece)


def build_compression(pieces: Sequence[str], decode: Callable[[int], str] | None = None) -> np.ndarray:
  """Surjective map raw id -> compressed id (np.int32 [V]); compressed ids are numbered by first appearance.

  Two paths to each id's text:
    * piece path (`decode=None`): the text is read off the piece string (`decode_piece`: SentencePiece's
      '\u2581' is a space, '<0xNN>' is a byte). Needs only the piece list.
    * decode path (`decode` given): the text is `decode(i)`, the tokenizer's decode of the id alone with special
      tokens kept -- exactly how the official demo builds its map; `pieces[i]` is the raw token string, used as the
      key when the text holds U+FFFD. See `engram_jax.vocab` for SentencePiece and HF `tokenizers` adapters.
  The two paths differ where a tokenizer's decode differs from its piece string: for SentencePiece the bare
  '\u2581' piece and the control pieces (pad, eos) decode to '' (one merged id), and unk decodes to ' \u2047 '. One
  id more or less changes V', hence every multiplier of the 64-bit hash: use the path the table was trained with.
  The reduction ratio is logged and available from `reduction_ratio(map)`.
  """
  if len(pieces) == 0:
    raise ValueError("build_compression: the vocabulary (pieces) is empty")
  key_to_new: dict[str, int] = {}
  out = np.empty(len(pieces), np.int32)
  for i, piece in enumerate(pieces):
    key = compression_key(piece) if decode is None else compression_key_from_text(decode(i), piece)
    out[i] = key_to_new.setdefault(key, len(key_to_new))
  logging.info("tokenizer compression (%s path): %d -> %d ids (%.1f%% reduction)",
               "piece" if decode is None else "decode", len(pieces), len(key_to_new), 100 * reduction_ratio(out))
  return out


def identity_compression(vocab_size: int) -> np.ndarray:
  """The identity map (np.int32 [V]): Engram without tokenizer compression."""
  if vocab_size < 1:
    raise ValueError(f"identity_compression: vocab_size must be >= 1, got {vocab_size}")
  return np.arange(vocab_size, dtype=np.int32)


def reduction_ratio(compression: np.ndarray) -> float:
  """1 - V' / V: the fraction of vocabulary ids removed by the compression (paper: 23.4% on a 128k vocab)."""
  compression = np.asarray(compression)
  return 1.0 - compressed_vocab_size(compression) / compression.size


def compressed_vocab_size(compression: np.ndarray) -> int:
  """V' = max compressed id + 1."""
  return int(np.max(compression)) + 1


def check_compression(compression: np.ndarray) -> np.ndarray:
  """Validates a map (1-D integer, values in [0, V'), every compressed id used) and returns it as np.int32 [V]."""
  c = np.asarray(compression)
  if c.ndim != 1 or c.size == 0 or not np.issubdtype(c.dtype, np.integer):
    raise ValueError(f"compression: expected a non-empty 1-D integer array [V], got dtype {c.dtype} shape {c.shape}")
  if c.min() < 0 or c.max() >= np.iinfo(np.int32).max:
    raise ValueError(f"compression: ids must lie in [0, 2^31 - 1), got range [{c.min()}, {c.max()}]")
  if np.unique(c).size != int(c.max()) + 1:
    raise ValueError("compression: compressed ids must be exactly 0..V'-1 (a surjective map); rebuild it with "
                     "build_compression or identity_compression")
  return c.astype(np.int32)


def save_compression(path: str, compression: np.ndarray) -> None:
  """Saves a map as .npy so a run can hash without its tokenizer."""
  np.save(path, check_compression(compression))


def load_compression(path: str) -> np.ndarray:
  """Loads (and validates) a map saved by `save_compression`."""
  return check_compression(np.load(path))


# ----------------------------------------------------------------------------------------------------------------
# Hash specification
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HashSpec:
  """Everything needed to hash one Engram layer; plain ints, so numpy and jnp read the same constants."""

  layer_id: int
  max_ngram: int  # N
  heads_per_order: int  # K
  multipliers: tuple[int, ...]  # [N] odd m_i; m_i multiplies x'_{t-i}.
  primes: tuple[tuple[int, ...], ...]  # [N-1][K] table size (modulus) of head k of order n = 2 + index.
  pad_id: int  # Compressed pad id read before the sequence / document start.
  vocab_size: int  # V' (compressed): ids must lie in [0, V').
  hash_bits: int  # 32 or 64, see the module docstring.

  @property
  def num_heads(self) -> int:
    """H = (N - 1) * K."""
    return (self.max_ngram - 1) * self.heads_per_order

  @property
  def head_sizes(self) -> np.ndarray:
    """[H] rows of each head's table, order-major (all heads of order 2, then order 3, ...)."""
    return np.asarray([p for order in self.primes for p in order], np.int64)

  @property
  def offsets(self) -> np.ndarray:
    """[H] first row of each head in a flat table of sum(head_sizes) rows."""
    sizes = self.head_sizes
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)

  @property
  def total_rows(self) -> int:
    return int(self.head_sizes.sum())


def _is_prime(n: int) -> bool:
  if n < 2:
    return False
  if n % 2 == 0:
    return n == 2
  f = 3
  while f * f <= n:
    if n % f == 0:
      return False
    f += 2
  return True


def next_unused_prime(start: int, used: set[int]) -> int:
  """The smallest prime >= start that is not in `used`."""
  n = max(start, 2)
  while not _is_prime(n) or n in used:
    n += 1
  return n


def allocate_primes(base_sizes: Sequence[int], heads_per_order: int, layer_ids: Sequence[int]
                    ) -> dict[int, tuple[tuple[int, ...], ...]]:
  """Primes per layer [N-1][K], unique over all layers, orders and heads (the demo's order: layer, order, head;
  each head's search starts at the previous head's prime)."""
  used: set[int] = set()
  out = {}
  for layer_id in layer_ids:
    per_order = []
    for base in base_sizes:
      start, heads = int(base), []
      for _ in range(heads_per_order):
        p = next_unused_prime(start, used)
        used.add(p)
        heads.append(p)
        start = p
      per_order.append(tuple(heads))
    out[int(layer_id)] = tuple(per_order)
  return out


def layer_multipliers(seed: int, layer_id: int, max_ngram: int, vocab_size: int, hash_bits: int) -> tuple[int, ...]:
  """[N] odd multipliers of one layer, drawn from default_rng(seed + 10007 * layer_id); bounded per `hash_bits`."""
  rng = np.random.default_rng(int(seed + LAYER_SEED_STRIDE * int(layer_id)))
  if hash_bits == 64:
    half_bound = max(1, (np.iinfo(np.int64).max // int(vocab_size)) // 2)  # m_i * (V' - 1) < int64max.
  elif hash_bits == 32:
    half_bound = 1 << 31  # m_i < 2^32; products wrap modulo 2^32 by definition.
  else:
    raise ValueError(f"hash_bits must be 32 or 64, got {hash_bits}")
  r = rng.integers(low=0, high=half_bound, size=(max_ngram,), dtype=np.int64)
  return tuple(int(2 * v + 1) for v in r)


def make_hash_specs(*, max_ngram: int, heads_per_order: int, table_base_sizes: Sequence[int], seed: int,
                    hash_bits: int, layer_ids: Sequence[int], vocab_size: int, pad_id: int) -> dict[int, HashSpec]:
  """One HashSpec per layer id, primes allocated jointly (unique across layers). `vocab_size` and `pad_id` are
  in the compressed id space."""
  if max_ngram < 2:
    raise ValueError(f"max_ngram must be >= 2 (orders 2..N are hashed), got {max_ngram}")
  if heads_per_order < 1:
    raise ValueError(f"heads_per_order must be >= 1, got {heads_per_order}")
  if len(table_base_sizes) != max_ngram - 1:
    raise ValueError(f"table_base_sizes needs one entry per order 2..{max_ngram} ({max_ngram - 1} values), "
                     f"got {len(table_base_sizes)}: {tuple(table_base_sizes)}")
  if min(table_base_sizes) < 2:
    raise ValueError(f"table_base_sizes must all be >= 2 (each head's table has a prime number of rows), "
                     f"got {tuple(table_base_sizes)}")
  if hash_bits not in (32, 64):
    raise ValueError(f"hash_bits must be 32 (uint32, TPU-safe) or 64 (demo int64, needs x64), got {hash_bits}")
  if len(set(layer_ids)) != len(layer_ids) or not layer_ids:
    raise ValueError(f"layer_ids must be non-empty and unique, got {tuple(layer_ids)}")
  if not 0 <= pad_id < vocab_size:
    raise ValueError(f"pad_id {pad_id} is outside the compressed vocabulary [0, {vocab_size})")
  primes = allocate_primes(table_base_sizes, heads_per_order, layer_ids)
  specs = {}
  for layer_id in layer_ids:
    spec = HashSpec(layer_id=int(layer_id), max_ngram=max_ngram, heads_per_order=heads_per_order,
                    multipliers=layer_multipliers(seed, layer_id, max_ngram, vocab_size, hash_bits),
                    primes=primes[int(layer_id)], pad_id=int(pad_id), vocab_size=int(vocab_size), hash_bits=hash_bits)
    if spec.total_rows >= 2**31:
      raise ValueError(f"table_base_sizes {tuple(table_base_sizes)}: layer {layer_id} needs {spec.total_rows} rows, "
                       "which does not fit int32 row ids; use smaller base sizes or fewer heads")
    specs[int(layer_id)] = spec
  return specs


# ----------------------------------------------------------------------------------------------------------------
# The hash: numpy and jnp twins
# ----------------------------------------------------------------------------------------------------------------


def _shifted_np(x: np.ndarray, seg: np.ndarray, k: int, pad: int) -> np.ndarray:
  """x'_{t-k} with pad before the row start or the token's document start."""
  if k == 0:
    return x
  s = x.shape[1]
  xs = np.full_like(x, pad)
  xs[:, k:] = x[:, :s - k]
  same = np.zeros(x.shape, bool)
  same[:, k:] = seg[:, k:] == seg[:, :s - k]
  return np.where(same, xs, pad)


def hash_ngrams_np(compressed_ids: np.ndarray, segment_ids: np.ndarray | None, spec: HashSpec, *,
                   history: np.ndarray | None = None) -> np.ndarray:
  """Row ids local to each head, np.int32 [B, S, H] (head h reads row r + spec.offsets[h] of a flat table).

  compressed_ids [B, S] in [0, V'); segment_ids [B, S] or None (one document per row);
  history [B, N-1] (optional, decode): the compressed ids just before this chunk (then segment_ids must be None).
  """
  x = np.asarray(compressed_ids)
  if x.ndim != 2:
    raise ValueError(f"hash_ngrams_np: compressed_ids must be [B, S], got shape {x.shape}")
  s = x.shape[1]
  if history is not None:
    if segment_ids is not None:
      raise ValueError("hash_ngrams_np: pass either history (decode) or segment_ids (packed rows), not both")
    x = np.concatenate([np.asarray(history), x], axis=1)  # [B, N-1+S]
  if x.size and (x.min() < 0 or x.max() >= spec.vocab_size):
    raise ValueError(f"hash_ngrams_np: compressed ids must lie in [0, {spec.vocab_size}), got range "
                     f"[{x.min()}, {x.max()}]; map raw ids through the compression first")
  seg = np.zeros(x.shape, np.int32) if segment_ids is None else np.asarray(segment_ids)
  dt = np.uint32 if spec.hash_bits == 32 else np.int64
  x = x.astype(dt)
  shifts = [_shifted_np(x, seg, k, spec.pad_id) for k in range(spec.max_ngram)]
  mults = [dt(m) for m in spec.multipliers]
  out = []
  mix = shifts[0] * mults[0]
  for n in range(2, spec.max_ngram + 1):
    mix = np.bitwise_xor(mix, shifts[n - 1] * mults[n - 1])  # [B, S]: XOR over i < n.
    for p in spec.primes[n - 2]:
      out.append(mix % dt(p))
  rows = np.stack(out, axis=-1).astype(np.int32)  # [B, S(+N-1), H]
  return rows[:, x.shape[1] - s:]


@functools.lru_cache(maxsize=256)
def _window_constants(spec: HashSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(multipliers [N], head -> order index [H], primes [H]) in the hash's dtype, for hash_window_np."""
  dt = np.uint32 if spec.hash_bits == 32 else np.int64
  order = np.concatenate([np.full(len(ps), i + 1) for i, ps in enumerate(spec.primes)])
  primes = np.asarray([p for ps in spec.primes for p in ps], dt)
  return np.asarray(spec.multipliers, dt), order, primes


def hash_window_np(window: np.ndarray, spec: HashSpec) -> np.ndarray:
  """Decode fast path of `hash_ngrams_np`, bit-identical to it with `history`: window [B, N-1+T] compressed ids
  (the N-1 ids before a chunk, then the chunk's T ids; one document) -> local rows np.int32 [B, T, H].

  A handful of numpy calls whatever N and T (no shifted copies per order), which is what a one-token decode step
  needs on its critical path.
  """
  x = np.asarray(window)
  n = spec.max_ngram
  if x.ndim != 2 or x.shape[1] < n:
    raise ValueError(f"hash_window_np: window must be [B, N-1+T] with T >= 1 (N = {n}), got shape {x.shape}")
  if x.size and (x.min() < 0 or x.max() >= spec.vocab_size):
    raise ValueError(f"hash_window_np: compressed ids must lie in [0, {spec.vocab_size}), got range "
                     f"[{x.min()}, {x.max()}]; map raw ids through the compression first")
  mults, order, primes = _window_constants(spec)
  t = x.shape[1] - (n - 1)
  idx = np.arange(n - 1, n - 1 + t)[:, None] - np.arange(n)[None, :]  # [T, N]: positions of x_t, x_{t-1}, ...
  mix = np.bitwise_xor.accumulate(x[:, idx].astype(mults.dtype) * mults, axis=-1)  # [B, T, N]: [n-1] = order n
  return (mix[..., order] % primes).astype(np.int32)


def _check_x64(spec: HashSpec) -> None:
  if spec.hash_bits == 64 and not jax.config.jax_enable_x64:
    raise ValueError("hash_bits=64 reproduces the demo's int64 hashing and needs jax x64 "
                     "(jax.config.update('jax_enable_x64', True)); use hash_bits=32 otherwise")


def _shifted_jnp(x: jax.Array, seg: jax.Array, k: int, pad: jax.Array) -> jax.Array:
  if k == 0:
    return x
  xs = jnp.pad(x, ((0, 0), (k, 0)), constant_values=pad)[:, :-k]  # [B, S]
  ss = jnp.pad(seg, ((0, 0), (k, 0)), constant_values=-1)[:, :-k]  # -1: no document before the row start.
  return jnp.where(ss == seg, xs, pad)


def hash_ngrams_jnp(compressed_ids: jax.Array, segment_ids: jax.Array | None, spec: HashSpec, *,
                    history: jax.Array | None = None) -> jax.Array:
  """In-graph twin of `hash_ngrams_np` (bit-identical): int32 [B, S, H].

  history [B, N-1] (optional): the compressed ids just before this chunk, same document (decode); with it the
  chunk's first positions read real context instead of the pad id, and segment_ids must be None.
  """
  _check_x64(spec)
  dt = jnp.uint32 if spec.hash_bits == 32 else jnp.int64
  x = jnp.asarray(compressed_ids).astype(dt)
  s = x.shape[1]
  if history is not None:
    if segment_ids is not None:
      raise ValueError("hash_ngrams_jnp: pass either history (decode) or segment_ids (packed rows), not both")
    x = jnp.concatenate([jnp.asarray(history).astype(dt), x], axis=1)  # [B, N-1+S]
  seg = jnp.zeros(x.shape, jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
  pad = jnp.asarray(spec.pad_id, dt)
  shifts = [_shifted_jnp(x, seg, k, pad) for k in range(spec.max_ngram)]
  mults = [jnp.asarray(m, dt) for m in spec.multipliers]
  out = []
  mix = shifts[0] * mults[0]
  for n in range(2, spec.max_ngram + 1):
    mix = mix ^ (shifts[n - 1] * mults[n - 1])  # [B, S]
    for p in spec.primes[n - 2]:
      out.append(mix % jnp.asarray(p, dt))
  rows = jnp.stack(out, axis=-1).astype(jnp.int32)  # [B, S(+N-1), H]
  return rows[:, -s:] if history is not None else rows


def hash_specs_summary(specs: Mapping[int, HashSpec]) -> dict[int, dict]:
  """A JSON-friendly record of the specs (to save with a run)."""
  return {l: dataclasses.asdict(s) for l, s in specs.items()}
