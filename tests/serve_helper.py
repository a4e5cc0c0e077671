"""A tiny Engram model and SentencePiece tokenizer for the server tests; run as a script it serves them.

    python tests/serve_helper.py PORT TOKENIZER_MODEL API_KEY [--host-tables]
"""

import sys

import numpy as np
from flax import nnx

from engram_jax.decode import DecodeConfig, Engine, SentencePieceTokenizer
from engram_jax.layers.engram_config import EngramConfig
from engram_jax.models.config import ModelConfig
from engram_jax.models.decoder import Decoder
from engram_jax.serve import ServeConfig, run

V = 80  # >= the tokenizer's pieces
CFG = ModelConfig(vocab_size=V, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, dense_hidden=32,
                  engram_layers=(1,), engram=EngramConfig(heads_per_order=2, head_dim=4, table_base_sizes=(53, 59),
                                                          table_row_multiple=8))
DECODE = DecodeConfig(batch_size=4, max_len=48, prefill_chunk=8, top_logprobs=3)
SERVE = dict(max_body_bytes=4096, max_prompts=4, max_tokens_limit=16, batch_wait_ms=20.0)
WORDS = "the cat sat on a mat and a dog ran far away from the big red house with a green door".split()


def train_tokenizer(directory) -> str:
  """A 60-piece SentencePiece model (pad 0, eos 1, unk 2, no bos) on a toy language; returns its path."""
  import sentencepiece as spm
  rng = np.random.default_rng(0)
  lines = [" ".join(rng.choice(WORDS, size=12)) for _ in range(300)]
  prefix = f"{directory}/tok"
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=60,
                                 model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                 hard_vocab_limit=False, minloglevel=2, num_threads=1)
  return f"{prefix}.model"


def build_model() -> Decoder:
  return Decoder(CFG, rngs=nnx.Rngs(0))


if __name__ == "__main__":
  port, tokenizer_path, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
  placement = "host" if "--host-tables" in sys.argv else "device"
  tokenizer = SentencePieceTokenizer(tokenizer_path)
  engine = Engine(build_model(), DecodeConfig(**{**DECODE.__dict__, "table_placement": placement}),
                  tokenizer=tokenizer)
  run(engine, tokenizer, ServeConfig(port=port, api_key=key, **SERVE))
