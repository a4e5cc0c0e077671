"""Demo-exact tokenizer compression: the per-id decode path against a transcription of the official demo's map.

The transcription below is written from the demo's description (decode each id alone with special tokens kept;
text with U+FFFD keeps the raw token; else the normal form, or the text when the normal form is empty; ids numbered
by first appearance) and normalises with the `tokenizers` normalizer sequence the demo itself builds -- so it shares
no code with engram_jax.hashing, whose normalizer is a pure-Python re-implementation.
"""

from __future__ import annotations

import numpy as np
import pytest

from engram_jax import hashing, vocab

tokenizers = pytest.importorskip("tokenizers")
spm = pytest.importorskip("sentencepiece")

# Text with the cases where the two normalizers could part: accents, ligatures, final sigma, spacing marks (Mc),
# enclosing marks (Me), information separators, U+E000, no-break and ideographic spaces, dotted capital I.
TEXT = (
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! Café au lait, cafe au lait.\n"
    "ΟΔΟΣ ΚΑΙ ΠΟΛΙΣ, οδος και πολις. Σ Σ ΣΑΣ. İstanbul istanbul ISTANBUL.\n"
    "कार्य कार्य हिंदी भाषा. ﬁne ﬂour ½ ① ⑴. Naïve résumé façade coöperate — tabs\tand  double  spaces.\n"
    "a\x1cb c\x1dd \ue000 x\xa0y z\u3000w 1\u20dd 2\u20dd. 日本語のテキスト。 emoji 🙂🙂 ok.\n"
) * 6


def _demo_normalizer():
  from tokenizers import Regex, normalizers

  sentinel = "\ue000"
  return normalizers.Sequence([
      normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
      normalizers.Replace(Regex(r"[ \t\r\n]+"), " "), normalizers.Replace(Regex(r"^ $"), sentinel),
      normalizers.Strip(), normalizers.Replace(sentinel, " ")])


def demo_lookup_table(size, decode_one, raw_token):
  """Transcription of the demo's map: (lookup int64 [V], number of compressed ids)."""
  norm = _demo_normalizer()
  key2new, lookup = {}, np.empty(size, np.int64)
  for tid in range(size):
    text = decode_one(tid)
    if "\ufffd" in text:
      key = raw_token(tid)
    else:
      n = norm.normalize_str(text)
      key = n if n else text
    lookup[tid] = key2new.setdefault(key, len(key2new))
  return lookup, len(key2new)


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory):
  d = tmp_path_factory.mktemp("spm_demo")
  (d / "text.txt").write_text(TEXT)
  spm.SentencePieceTrainer.train(
      input=str(d / "text.txt"), model_prefix=str(d / "m"), vocab_size=420, hard_vocab_limit=False,
      model_type="unigram", byte_fallback=True, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
      user_defined_symbols=["ΟΣ", "\ue000", "ा"], minloglevel=2)
  return d / "m.model"


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
  """A byte-level BPE tokenizer (DeepSeek's kind) trained on TEXT, with special and added tokens."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<eos>", "<unk>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(TEXT.splitlines(), trainer)
  tok.add_tokens(["ΣΑΣ", "\ue000 ", " The"])
  path = tmp_path_factory.mktemp("bpe_demo") / "tokenizer.json"
  tok.save(str(path))
  return path


def test_sentencepiece_decode_path_equals_demo_map(sp_file):
  v = vocab.sentencepiece_vocab(sp_file)
  sp = spm.SentencePieceProcessor(model_file=str(sp_file))
  want, n_new = demo_lookup_table(sp.get_piece_size(), lambda i: sp.decode([i]), sp.id_to_piece)
  got = v.compression("decode")
  np.testing.assert_array_equal(got, want)
  assert hashing.compressed_vocab_size(got) == n_new
  assert got.dtype == np.int32 and 0 < hashing.reduction_ratio(got) < 0.6


def test_byte_level_bpe_decode_path_equals_demo_map(bpe_file):
  from tokenizers import Tokenizer

  tok = Tokenizer.from_file(str(bpe_file))
  size = tok.get_vocab_size(with_added_tokens=True)
  want, n_new = demo_lookup_table(size, lambda i: tok.decode([i], skip_special_tokens=False), tok.id_to_token)
  got = vocab.load_vocab(bpe_file).compression("decode")
  np.testing.assert_array_equal(got, want)
  assert hashing.compressed_vocab_size(got) == n_new
  # The vocabulary really exercises the U+FFFD rule (lone non-ASCII bytes keep their raw byte-level token).
  assert sum("\ufffd" in tok.decode([i], skip_special_tokens=False) for i in range(size)) >= 64


def test_normalizer_matches_the_demo_normalizer_on_hard_strings():
  norm = _demo_normalizer()
  cases = ["a\x1c", "\x1c", "ΟΔΟΣ", "ΑΣ Β", "का", "कार्य", "e\u0301", "\u20dd", "1\u20dd", "x\xa0", "\xa0", "\u3000a",
           "\x85b", "  ", " ", "\t", "\u2028", "a\u200b", "\ufeffa", "İ", "ǅ", "ẞ", "\u0345", "\ue000", "a\ue000 b",
           " \ue000", "½", "①", "ﬁ", "Ⅻ", "\t\n x \r", "Hello World", "\x00", "\ud7ff"]
  for text in cases:
    assert hashing.normalize_text(text) == norm.normalize_str(text), repr(text)


def test_piece_and_decode_paths_differ_on_sentencepiece_control_pieces(sp_file):
  """The demo's map merges pad, eos and the bare '\u2581' (all decode to ''); the piece path keeps them apart."""
  v = vocab.sentencepiece_vocab(sp_file)
  sp = spm.SentencePieceProcessor(model_file=str(sp_file))
  by_decode, by_piece = v.compression("decode"), v.compression("pieces")
  bare = sp.piece_to_id("\u2581")
  assert by_decode[0] == by_decode[1] == by_decode[bare]
  assert len({by_piece[0], by_piece[1], by_piece[bare]}) == 3
  n_decode, n_piece = hashing.compressed_vocab_size(by_decode), hashing.compressed_vocab_size(by_piece)
  # decode path: '' (pad, eos, bare piece) and '\u2047' (unk); piece path: '<pad>', '</s>', '<unk>' (bare piece -> ' ').
  assert n_piece - n_decode == 1
  # With the 64-bit hash, V' bounds the multipliers: one id more changes every multiplier of the layer.
  m_decode = hashing.layer_multipliers(0, 1, 3, n_decode, 64)
  m_piece = hashing.layer_multipliers(0, 1, 3, n_piece, 64)
  assert all(a != b for a, b in zip(m_decode, m_piece))
  assert hashing.layer_multipliers(0, 1, 3, n_decode, 32) == hashing.layer_multipliers(0, 1, 3, n_piece, 32)


def test_hf_adapter_options_and_errors(bpe_file, tmp_path):
  v = vocab.hf_tokenizer_vocab(bpe_file, vocab_size=700)  # padded past the tokenizer: empty pieces, '' text
  size = vocab.hf_tokenizer_vocab(bpe_file).size
  assert v.size == 700 and v.pieces[-1] == "" and v.decode(699) == ""
  assert v.compression("decode")[size:].tolist() == [v.compression("decode")[size]] * (700 - size)
  cleaned = vocab.hf_tokenizer_vocab(bpe_file, clean_up_tokenization_spaces=True)
  dot = [i for i in range(size) if v.decode(i) == " ."]
  assert all(cleaned.decode(i) == "." for i in dot)
  with pytest.raises(FileNotFoundError, match="no such file"):
    vocab.hf_tokenizer_vocab(tmp_path / "missing.json")
  with pytest.raises(ValueError, match="neither"):
    vocab.load_vocab(tmp_path / "vocab.txt")
  with pytest.raises(ValueError, match="path must be"):
    v.compression("pieces_and_decode")
