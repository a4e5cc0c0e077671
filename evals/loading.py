"""A checkpoint as (model, what the evals need to know about it), through `engram_jax.run_dir.load_model`.

Runs written before the run record existed carry no tokenizer copy, task or sequence length: those are then read
from MODEL_DIR/config.gin (the operative gin config training writes) and the corpus's SentencePiece model.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
from pathlib import Path

from engram_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Loaded:
  """What the evals know about a checkpoint."""

  model: object  # the Decoder, parameters restored, no mesh
  model_config: ModelConfig
  step: int
  model_dir: Path  # the run directory (results go to model_dir/evals/step_<step>)
  seq_len: int  # the window the model was trained on (requests are left-truncated to it)
  tokenizer_path: str  # SentencePiece .model of the training task
  task: str
  data_dir: str | None


def _gin_value(text: str, name: str):
  """The value bound to `name` in an operative config.gin (following one macro reference), or None."""
  text = text.replace("\\\n", " ")  # gin wraps long lines with a backslash
  m = re.search(rf"^{re.escape(name)}\s*=\s*(.+)$", text, re.M)
  if not m:
    return None
  value = m.group(1).strip()
  if value.startswith("%"):
    return _gin_value(text, value[1:])
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return None


def load(path: str | os.PathLike) -> Loaded:
  """The checkpoint at `path` (a MODEL_DIR, its checkpoints/ directory, or checkpoints/<step>)."""
  from engram_jax.data import prepare
  from engram_jax.run_dir import load_model
  model, record = load_model(path, mesh=None)
  model_dir = Path(str(record.model_dir))
  gin_text = (model_dir / "config.gin").read_text() if (model_dir / "config.gin").is_file() else ""
  seq_len = record.seq_len or _gin_value(gin_text, "RunConfig.seq_len")
  task = record.task or _gin_value(gin_text, "RunConfig.task") or "engram_corpus_en"
  data_dir = record.data_dir or _gin_value(gin_text, "RunConfig.data_dir")
  tokenizer = record.tokenizer_path
  if tokenizer is None or not Path(tokenizer).is_file():
    corpus = Path(data_dir) if data_dir else prepare.default_data_dir()
    manifest = prepare.verify_manifest(corpus, check_hashes=False)
    if manifest is None:
      raise ValueError(f"{model_dir} holds no tokenizer.model and its corpus {corpus} has no valid manifest; build "
                       "it (python -m engram_jax.data.prepare) or set ENGRAM_DATA_DIR to it")
    tokenizer = str(corpus / manifest["vocab"]["file"])
  if not seq_len:
    raise ValueError(f"{model_dir}: the training sequence length is recorded nowhere; set SEQ_LEN for the evals")
  return Loaded(model, record.model_config, int(record.step), model_dir, int(seq_len), str(tokenizer), str(task),
                str(data_dir) if data_dir else None)
