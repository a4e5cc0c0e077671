"""Tokenizer adapters for the compression map: a vocabulary as (raw pieces, single-id decode), read from files.

The official Engram demo builds its map from each id's decode alone (special tokens kept) and, for text holding
U+FFFD, the id's raw token string. `TokenizerVocab` carries exactly those two things, so
`hashing.build_compression(vocab.pieces, vocab.decode)` reproduces the demo's map for the same tokenizer.

Adapters (local files only, no network):
  * `sentencepiece_vocab(path)`: a SentencePiece `.model` file; decode = SentencePiece's own `decode([id])`.
  * `hf_tokenizer_vocab(path)`: a Hugging Face `tokenizer.json` (byte-level BPE as DeepSeek's, WordPiece, ...)
    read with the `tokenizers` package; decode = `Tokenizer.decode([id], skip_special_tokens=False)`, optionally
    followed by transformers' `clean_up_tokenization_spaces` rule when the tokenizer's config turns it on.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engram_jax import hashing

# transformers' clean_up_tokenization: spaces before punctuation and English contractions are removed.
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


@dataclasses.dataclass(frozen=True)
class TokenizerVocab:
  """A vocabulary as the compression map sees it."""

  pieces: tuple[str, ...]  # [V] raw token string of each id (the key for text holding U+FFFD).
  decode: Callable[[int], str]  # The id's text when decoded alone, special tokens kept.
  source: str  # Where it came from (a path), for logs and errors.

  @property
  def size(self) -> int:
    return len(self.pieces)

  def compression(self, path: str = "decode") -> np.ndarray:
    """The compression map np.int32 [V]: path 'decode' (the demo's, per-id decode) or 'pieces' (piece strings)."""
    if path == "decode":
      return hashing.build_compression(self.pieces, self.decode)
    if path == "pieces":
      return hashing.build_compression(self.pieces)
    raise ValueError(f"compression path must be 'decode' (the demo's map) or 'pieces', got {path!r}")


def _existing(path: str | Path, what: str) -> Path:
  p = Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"{what}: no such file {str(p)!r}")
  return p


def sentencepiece_fingerprint(model_bytes: bytes) -> str:
  """sha256 of a SentencePiece model's pieces and scores, one "piece<TAB>score" line per id: the vocabulary,
  without the training record a model file also carries (SentencePiece writes the path it trained to into it, so
  two identical vocabularies built in different directories can differ byte for byte)."""
  import sentencepiece as spm  # noqa: PLC0415 (optional dependency, imported when used)

  sp = spm.SentencePieceProcessor(model_proto=model_bytes)
  lines = "\n".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}" for i in range(sp.get_piece_size()))
  return hashlib.sha256(lines.encode()).hexdigest()


def sentencepiece_vocab(model_file: str | Path) -> TokenizerVocab:
  """A SentencePiece model file. Control pieces (pad, eos) and the bare '\u2581' piece decode to ''."""
  import sentencepiece as spm  # noqa: PLC0415 (optional dependency, imported when used)

  path = _existing(model_file, "sentencepiece_vocab")
  sp = spm.SentencePieceProcessor(model_file=str(path))
  n = sp.get_piece_size()
  return TokenizerVocab(pieces=tuple(sp.id_to_piece(i) for i in range(n)), decode=lambda i: sp.decode([i]),
                        source=str(path))


def hf_tokenizer_vocab(tokenizer_file: str | Path, *, clean_up_tokenization_spaces: bool = False,
                       vocab_size: int | None = None) -> TokenizerVocab:
  """An HF `tokenizers` JSON file. V = the tokenizer's size with added tokens (transformers' `len(tokenizer)`),
  or `vocab_size` when given (ids with no token decode to '' and have the piece '').

  clean_up_tokenization_spaces: apply transformers' cleanup after decoding, as `tokenizer.decode` does when the
  tokenizer config sets it (DeepSeek's tokenizers leave it off).
  """
  from tokenizers import Tokenizer  # noqa: PLC0415 (optional dependency, imported when used)

  path = _existing(tokenizer_file, "hf_tokenizer_vocab")
  tok = Tokenizer.from_file(str(path))
  n = tok.get_vocab_size(with_added_tokens=True) if vocab_size is None else int(vocab_size)
  if n < 1:
    raise ValueError(f"hf_tokenizer_vocab: vocab_size must be >= 1, got {n}")

  def decode(i: int) -> str:
    text = tok.decode([i], skip_special_tokens=False)
    if clean_up_tokenization_spaces:
      for a, b in _CLEANUP:
        text = text.replace(a, b)
    return text

  pieces = tuple(tok.id_to_token(i) or "" for i in range(n))
  return TokenizerVocab(pieces=pieces, decode=decode, source=str(path))


def load_vocab(path: str | Path, **kwargs) -> TokenizerVocab:
  """By file type: '.model' -> SentencePiece, '.json' -> HF tokenizers (kwargs go to `hf_tokenizer_vocab`)."""
  suffix = Path(path).suffix
  if suffix == ".model":
    return sentencepiece_vocab(path)
  if suffix == ".json":
    return hf_tokenizer_vocab(path, **kwargs)
  raise ValueError(f"load_vocab: {str(path)!r} is neither a SentencePiece '.model' nor an HF tokenizers '.json' file")
