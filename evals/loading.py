"""A checkpoint as (model, what the evals need to know about it).

`engram_jax.run_dir.load_model` is used when the library has it. Until then this module rebuilds the model from
what a training run already writes: checkpoints/model_config.json (the ModelConfig), the orbax step (parameters
and non-trainable variables, among them the Engram compression map) and MODEL_DIR/config.gin (sequence length,
task and corpus directory, hence the SentencePiece model).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from engram_jax.layers.engram_config import EngramConfig
from engram_jax.layers.moe_config import MoEConfig
from engram_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Loaded:
  """What the evals know about a checkpoint."""

  model: object  # the Decoder, parameters restored
  model_config: ModelConfig
  step: int
  model_dir: Path  # the run directory (results go to model_dir/evals/step_<step>)
  seq_len: int  # the window the model was trained on (requests are left-truncated to it)
  tokenizer_path: str  # SentencePiece .model of the training task
  task: str
  data_dir: str | None


def model_config_from_dict(d: dict) -> ModelConfig:
  """A ModelConfig from its checkpoint JSON (nested Engram / MoE configs; lists back to tuples)."""
  tup = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
  d = {k: tup(v) for k, v in d.items()}
  if d.get("engram") is not None:
    d["engram"] = EngramConfig(**{k: tup(v) for k, v in d["engram"].items()})
  if d.get("moe") is not None:
    d["moe"] = MoEConfig(**d["moe"])
  return ModelConfig(**d)


def _gin_value(text: str, name: str):
  """The value bound to `name` in an operative config.gin (following one macro reference), or None."""
  text = text.replace("\\\n", " ")  # gin wraps long lines with a backslash
  m = re.search(rf"^{re.escape(name)}\s*=\s*(.+)$", text, re.M)
  if not m:
    return None
  value = m.group(1).strip()
  if value.startswith("%"):
    return _gin_value(text, value[1:])
  import ast
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return None


def _fallback_load(path: str | os.PathLike) -> Loaded:
  import jax
  from flax import nnx

  from engram_jax import checkpoint as ckpt_lib
  from engram_jax import sharding
  from engram_jax.data import prepare
  from engram_jax.eval import resolve_checkpoint
  from engram_jax.models.decoder import Decoder
  from engram_jax.optim import OptimizerConfig
  from engram_jax.steps import make_setup

  directory, step = resolve_checkpoint(path)
  model_dir = directory.parent
  config = model_config_from_dict(json.loads((directory / ckpt_lib.CONFIG_FILE).read_text()))
  compression = model_dir / "engram_compression.npy"
  if config.engram_layers and compression.is_file():
    config = dataclasses.replace(config, engram_compression_path=str(compression))
  gin_text = (model_dir / "config.gin").read_text() if (model_dir / "config.gin").is_file() else ""
  seq_len = _gin_value(gin_text, "RunConfig.seq_len") or 256
  task = _gin_value(gin_text, "RunConfig.task") or "engram_corpus_en"
  data_dir = _gin_value(gin_text, "RunConfig.data_dir")
  corpus = Path(data_dir) if data_dir else prepare.default_data_dir()
  manifest = prepare.verify_manifest(corpus, check_hashes=False)
  if manifest is None:
    raise ValueError(f"the corpus of {model_dir} ({corpus}) has no valid manifest, so its SentencePiece model is "
                     "unknown; build it (python -m engram_jax.data.prepare) or set ENGRAM_DATA_DIR")
  mesh = sharding.make_mesh("data=1", devices=jax.devices()[:1])  # restore onto one device ...
  setup = make_setup(config, OptimizerConfig(), 1, mesh)
  checkpointer = ckpt_lib.Checkpointer(directory)
  restored = checkpointer.restore_subset(step, {k: setup.abstract[k] for k in ("params", "rest", "step")})
  checkpointer.close()
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(config, None, rngs=nnx.Rngs(0))))  # ... into a mesh-less model
  model = nnx.merge(graphdef, restored["params"], restored["rest"])
  return Loaded(model, config, int(jax.device_get(restored["step"])), model_dir, int(seq_len),
                str(corpus / manifest["vocab"]["file"]), str(task), str(data_dir) if data_dir else None)


def load(path: str | os.PathLike) -> Loaded:
  """The checkpoint at `path` (a MODEL_DIR, its checkpoints/ directory, or checkpoints/<step>)."""
  try:
    from engram_jax.run_dir import load_model
  except ImportError:
    return _fallback_load(path)
  model, record = load_model(path, mesh=None)
  return Loaded(model, record.model_config, int(record.step), Path(record.model_dir), int(record.seq_len),
                str(record.tokenizer_path), str(record.task), record.data_dir)
