"""The entry points on a real run directory (the tiny training run shared with the run-directory tests):
`python -m engram_jax.generate` streams greedy text equal to the Engine's on `load_model`; `count_rows` writes
row frequencies over the run's corpus and host tables + hot-row cache from them generate the same text."""

import numpy as np
import pytest

from engram_jax import count_rows, generate, host_table
from engram_jax.decode import DecodeConfig, Engine, Request, SentencePieceTokenizer
from engram_jax.run_dir import load_model

COMMON = ["--gin.CONTEXT=64", "--gin.DecodeConfig.prefill_chunk=8", "--gin.DecodeConfig.batch_size=2",
          "--prompt", "the cat sat on", "--max_new_tokens", "6"]


@pytest.fixture(scope="module")
def reference(straight):
  model_dir, _ = straight
  model, record = load_model(model_dir)
  tok = SentencePieceTokenizer(record.tokenizer_path)
  engine = Engine(model, DecodeConfig(batch_size=2, max_len=64, prefill_chunk=8, eos_id=tok.eos_id), tokenizer=tok)
  return engine.generate([Request(tok.encode("the cat sat on"), 6)])[0]


def test_generate_cli_streams_the_engines_greedy_text(straight, reference, capsys):
  model_dir, _ = straight
  out = generate.main([f"--gin.CHECKPOINT_PATH={model_dir}"] + COMMON)
  assert out[0].tokens == reference.tokens and out[0].text == reference.text
  printed = capsys.readouterr()
  assert printed.out == "the cat sat on" + reference.text + "\n"
  assert "tokens/s" in printed.err


def test_count_rows_then_host_tables_with_hot_rows_generate_the_same(straight, reference, tmp_path, capsys):
  model_dir, _ = straight
  path = count_rows.main([f"--gin.CHECKPOINT_PATH={model_dir}", "--max_tokens", "3000",
                          "--out", str(tmp_path / "counts.npz")])
  counts = host_table.load_row_counts(path)
  model, _ = load_model(model_dir)
  assert set(counts) == {1} and counts[1].size == model.blocks[1].engram.num_rows
  assert 3000 * 8 <= counts[1].sum() < 3100 * 8  # every token reads one row per head (8 heads)
  out = generate.main([f"--gin.CHECKPOINT_PATH={model_dir}", "--gin.DecodeConfig.table_placement='host'",
                       "--gin.DecodeConfig.hot_rows=64", f"--gin.ROW_COUNTS='{path}'"] + COMMON)
  assert out[0].tokens == reference.tokens
  assert "hit rate" in capsys.readouterr().err
  assert np.count_nonzero(counts[1]) > 64
