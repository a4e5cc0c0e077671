"""A run directory is a record: everything needed to rebuild the model sits beside its weights, so every later tool
needs only the path. `load_model(path)` is the one call that reads it.

    model, record = load_model("/tmp/engram_quickstart")          # or .../checkpoints, or .../checkpoints/300

MODEL_DIR holds, besides checkpoints/ (checkpoint.py), metrics and plots (train.py):
  run_record.json         written once, atomically, by training before its first step: the resolved ModelConfig,
                          the sha256 of the compression map and of the tokenizer, each Engram layer's hash spec
                          (primes, multipliers, offsets, hash_bits), the task, data directory and sequence length
  engram_compression.npy  Engram's tokenizer-compression map, np.int32 [V] (models with Engram layers)
  tokenizer.model         a copy of the task's SentencePiece model (the directory stays usable without the corpus)
Directories written before the record existed (checkpoints/model_config.json only) still load: the record is then
rebuilt from that file and the compression map saved next to it (or the identity map), without a tokenizer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import jax
import numpy as np

from engram_jax import checkpoint as ckpt_lib
from engram_jax import fileio, hashing
from engram_jax.layers.engram_config import EngramConfig
from engram_jax.layers.moe_config import MoEConfig
from engram_jax.models.config import ModelConfig

RECORD_FILE = "run_record.json"
COMPRESSION_FILE = "engram_compression.npy"
TOKENIZER_FILE = "tokenizer.model"
FORMAT_VERSION = 1
LEGACY_MODEL_FIELDS = ("engram_compression_path",)  # in model_config.json of older runs; no longer config


@dataclasses.dataclass(frozen=True)
class RunRecord:
  """What a run directory says about its model (see the module docstring)."""

  model_dir: str  # The run directory (MODEL_DIR).
  model_config: ModelConfig  # As first trained (compute-only fields such as compute_dtype may differ later).
  compression: np.ndarray | None  # Engram's map raw id -> compressed id, int32 [V]; None: no Engram layers.
  hash_specs: dict[int, hashing.HashSpec]  # Per Engram layer id: the hash training used.
  tokenizer_path: str | None  # MODEL_DIR/tokenizer.model (None: a run from before the record, or no SentencePiece).
  tokenizer_sha256: str | None
  task: str | None  # Data task of training (MIXTURE_OR_TASK_NAME).
  data_dir: str | None  # Its corpus directory (None: the task reads no local corpus).
  seq_len: int | None  # Training sequence length.
  run_config: dict  # The RunConfig of the first training session, as JSON (for reference).
  step: int | None = None  # The checkpoint step `load_model` restored.
  # sha256 of the tokenizer's pieces and scores (engram_jax.vocab.sentencepiece_fingerprint): equal for the same
  # vocabulary whatever file bytes hold it; what a resumed run or a branch is checked against.
  tokenizer_pieces_sha256: str | None = None

  @property
  def needs_x64(self) -> bool:
    """True when an Engram layer hashes with 64-bit integers (jax x64 must be on to run the model)."""
    return any(s.hash_bits == 64 for s in self.hash_specs.values())


# ------------------------------------------------------------------------------------------------ (de)serialisation


def model_config_from_dict(d: dict) -> ModelConfig:
  """The inverse of checkpoint.config_to_dict (fields of older versions listed in LEGACY_MODEL_FIELDS are dropped)."""
  d = {k: v for k, v in d.items() if k not in LEGACY_MODEL_FIELDS}
  if d.get("moe") is not None:
    d["moe"] = MoEConfig(**d["moe"])
  if d.get("engram") is not None:
    d["engram"] = EngramConfig(**{**d["engram"], "table_base_sizes": tuple(d["engram"]["table_base_sizes"])})
  d["engram_layers"] = tuple(d.get("engram_layers", ()))
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"model config fields {unknown} are unknown to this version of engram_jax (the run was written "
                     "by a newer one); update the code")
  return ModelConfig(**d)


def _spec_to_json(spec: hashing.HashSpec) -> dict:
  return {**dataclasses.asdict(spec), "offsets": spec.offsets.tolist(), "total_rows": spec.total_rows}


def _spec_from_json(d: dict) -> hashing.HashSpec:
  fields = {f.name for f in dataclasses.fields(hashing.HashSpec)}
  d = {k: v for k, v in d.items() if k in fields}
  return hashing.HashSpec(**{**d, "multipliers": tuple(d["multipliers"]), "primes": tuple(map(tuple, d["primes"]))})


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def compression_sha256(compression: np.ndarray) -> str:
  return sha256_bytes(np.ascontiguousarray(compression, np.int32).tobytes())


def model_hash_specs(model_config: ModelConfig, compression: np.ndarray | None, mesh=None
                     ) -> dict[int, hashing.HashSpec]:
  """The hash spec of every Engram layer, read from the (abstract) model the config and map build (building it
  also runs every construction-time check of the config, on `mesh` if given)."""
  if not model_config.engram_layers:
    return {}
  from flax import nnx
  from engram_jax.models.decoder import Decoder
  with _x64(model_config):
    model = nnx.eval_shape(lambda: Decoder(model_config, mesh, compression=compression, rngs=nnx.Rngs(0)))
  return {i: b.engram.spec for i, b in enumerate(model.blocks) if b.engram is not None}


def _x64(model_config: ModelConfig):
  """jax x64 on for models that hash with 64-bit integers (EngramConfig.hash_bits=64), else a no-op context."""
  wide = bool(model_config.engram_layers) and model_config.engram is not None and model_config.engram.hash_bits == 64
  return jax.enable_x64(True) if wide else jax.enable_x64(jax.config.jax_enable_x64)


x64_context = _x64


# ------------------------------------------------------------------------------------------------ writing


def task_compression(model_config: ModelConfig, mode: str, vocab) -> np.ndarray | None:
  """Engram's map np.int32 [V] for a model trained on `vocab` (a seqio vocabulary): None without Engram layers;
  mode 'none': the identity; 'vocab': pieces that normalise alike share an id (paper section 2.2); model ids past
  the tokenizer's (vocabulary padding) keep ids of their own."""
  if not model_config.engram_layers:
    return None
  tokenizer = getattr(vocab, "tokenizer", None)
  if mode == "none" or tokenizer is None:
    return hashing.identity_compression(model_config.vocab_size)
  pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.get_piece_size())]
  compression = hashing.build_compression(pieces)
  extra = model_config.vocab_size - len(pieces)  # [V - pieces] unused model ids
  return np.concatenate([compression, compression.max() + 1 + np.arange(max(extra, 0), dtype=np.int32)])


def begin_run(model_dir, model_config: ModelConfig, run_config: Any, vocab, data_dir: str | None,
              has_checkpoints: bool, mesh=None) -> RunRecord:
  """The run's record: MODEL_DIR's own when it holds one (checked against this run: same model, map and
  tokenizer), else a new one written by process 0 (the others wait). A record without any checkpoint protects
  nothing yet and is replaced."""
  tokenizer_bytes = getattr(vocab, "sp_model", None)
  current = new_record(model_dir, model_config, run_config,
                       compression=task_compression(model_config, run_config.engram_compression, vocab),
                       tokenizer_sha256=sha256_bytes(tokenizer_bytes) if tokenizer_bytes else None, data_dir=data_dir,
                       mesh=mesh)
  if tokenizer_bytes:
    current = dataclasses.replace(current, tokenizer_pieces_sha256=_pieces_sha256(tokenizer_bytes))
  saved = read_record(model_dir)
  if saved is not None and has_checkpoints:
    check_compatible(saved, current)
    if (fileio.as_path(model_dir) / RECORD_FILE).exists():  # it stays as first written
      return saved
    current = dataclasses.replace(current, compression=saved.compression)  # an older run: record it now
  if jax.process_index() == 0:
    write_record(current, tokenizer_bytes)
    if current.compression is not None:
      c = current.compression
      print(f"engram tokenizer compression: {c.size} -> {hashing.compressed_vocab_size(c)} ids "
            f"({100 * hashing.reduction_ratio(c):.1f}% reduction)", flush=True)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("engram_jax run record written")
  return current


def new_record(model_dir, model_config: ModelConfig, run_config: Any, *, compression: np.ndarray | None,
               tokenizer_sha256: str | None, data_dir: str | None, mesh=None) -> RunRecord:
  """The record of a run about to start (nothing written yet)."""
  model_dir = fileio.as_path(model_dir)
  return RunRecord(
      model_dir=str(model_dir), model_config=model_config, compression=compression,
      hash_specs=model_hash_specs(model_config, compression, mesh),
      tokenizer_path=str(model_dir / TOKENIZER_FILE) if tokenizer_sha256 else None,
      tokenizer_sha256=tokenizer_sha256, task=run_config.task, data_dir=data_dir, seq_len=run_config.seq_len,
      run_config=ckpt_lib.config_to_dict(run_config))


def write_record(record: RunRecord, tokenizer_bytes: bytes | None) -> None:
  """Writes the map, the tokenizer copy, then run_record.json last (its presence means the rest is complete)."""
  model_dir = fileio.as_path(record.model_dir)
  body = {"format_version": FORMAT_VERSION, "model_config": ckpt_lib.config_to_dict(record.model_config),
          "compression": None, "hash_specs": {str(k): _spec_to_json(s) for k, s in record.hash_specs.items()},
          "tokenizer": None, "task": record.task, "data_dir": record.data_dir, "seq_len": record.seq_len,
          "run_config": record.run_config}
  if record.compression is not None:
    buf = _npy_bytes(record.compression)
    fileio.atomic_write(model_dir / COMPRESSION_FILE, buf)
    body["compression"] = {"file": COMPRESSION_FILE, "sha256": compression_sha256(record.compression),
                           "size": int(record.compression.size),
                           "compressed_size": hashing.compressed_vocab_size(record.compression)}
  if tokenizer_bytes is not None:
    fileio.atomic_write(model_dir / TOKENIZER_FILE, tokenizer_bytes)
    body["tokenizer"] = {"file": TOKENIZER_FILE, "sha256": sha256_bytes(tokenizer_bytes),
                         "pieces_sha256": record.tokenizer_pieces_sha256}
  fileio.write_json(model_dir / RECORD_FILE, body)


def _npy_bytes(array: np.ndarray) -> bytes:
  import io
  buf = io.BytesIO()
  np.save(buf, np.asarray(array, np.int32))
  return buf.getvalue()


def _pieces_sha256(tokenizer_bytes: bytes) -> str:
  from engram_jax.vocab import sentencepiece_fingerprint  # noqa: PLC0415 (sentencepiece loads only when needed)
  return sentencepiece_fingerprint(tokenizer_bytes)


def _tokenizers_differ(saved: RunRecord, current: RunRecord) -> bool:
  """By pieces and scores where both records know them (a rebuilt corpus with the same vocabulary is the same
  tokenizer, though older corpus builds embedded their build directory in the file), else by file sha256."""
  if saved.tokenizer_pieces_sha256 and current.tokenizer_pieces_sha256:
    return saved.tokenizer_pieces_sha256 != current.tokenizer_pieces_sha256
  return bool(saved.tokenizer_sha256 and current.tokenizer_sha256 and saved.tokenizer_sha256 != current.tokenizer_sha256)


def check_compatible(saved: RunRecord, current: RunRecord) -> None:
  """Raises ValueError (naming what differs and the fix) when `current` cannot continue the run `saved` records."""
  problems = ckpt_lib.config_differences(ckpt_lib.config_to_dict(saved.model_config),
                                         ckpt_lib.config_to_dict(current.model_config))
  if _tokenizers_differ(saved, current):
    problems.append(f"tokenizer pieces: {(saved.tokenizer_pieces_sha256 or saved.tokenizer_sha256)[:12]} -> "
                    f"{(current.tokenizer_pieces_sha256 or current.tokenizer_sha256)[:12]} (task {current.task!r}, "
                    f"data_dir {current.data_dir!r}: the corpus' vocabulary changed)")
  elif (saved.compression is None) != (current.compression is None) or (
      saved.compression is not None and not np.array_equal(saved.compression, current.compression)):
    problems.append("Engram compression map differs (RunConfig.engram_compression or the task's vocabulary)")
  if not problems and saved.hash_specs != current.hash_specs:
    problems.append(f"Engram hash specs: recorded {saved.hash_specs} but this code derives {current.hash_specs} "
                    "(the hashing code changed since the run started)")
  if problems:
    raise ValueError(f"{saved.model_dir} holds a run of another model or data:\n  " + "\n  ".join(problems) +
                     f"\nFix: rerun with the run's own settings (recorded in {saved.model_dir}/{RECORD_FILE} and "
                     "config.gin), or train this configuration in a new MODEL_DIR.")


# ------------------------------------------------------------------------------------------------ reading


def read_record(model_dir) -> RunRecord | None:
  """The record of a run directory (rebuilt for runs from before the record existed); None if it holds no run."""
  model_dir = fileio.as_path(model_dir)
  path = model_dir / RECORD_FILE
  if path.exists():
    return _parse_record(model_dir, fileio.read_json(path))
  legacy = model_dir / "checkpoints" / ckpt_lib.CONFIG_FILE
  if legacy.exists():
    return _legacy_record(model_dir, fileio.read_json(legacy))
  return None


def _parse_record(model_dir, body: dict) -> RunRecord:
  if body.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{model_dir / RECORD_FILE}: format_version {body.get('format_version')} is not "
                     f"{FORMAT_VERSION}; use the engram_jax version that wrote it")
  compression = None
  if body["compression"] is not None:
    compression = _load_map(model_dir / body["compression"]["file"], body["compression"]["sha256"])
  tokenizer = body.get("tokenizer")
  pieces_sha256 = tokenizer.get("pieces_sha256") if tokenizer else None
  if tokenizer and "pieces_sha256" not in tokenizer and (model_dir / tokenizer["file"]).exists():  # an older record
    pieces_sha256 = _pieces_sha256((model_dir / tokenizer["file"]).read_bytes())
  return RunRecord(
      model_dir=str(model_dir), model_config=model_config_from_dict(body["model_config"]), compression=compression,
      hash_specs={int(k): _spec_from_json(v) for k, v in body["hash_specs"].items()},
      tokenizer_path=str(model_dir / tokenizer["file"]) if tokenizer else None,
      tokenizer_sha256=tokenizer["sha256"] if tokenizer else None, task=body.get("task"),
      data_dir=body.get("data_dir"), seq_len=body.get("seq_len"), run_config=body.get("run_config") or {},
      tokenizer_pieces_sha256=pieces_sha256)


def _load_map(path, sha256: str | None) -> np.ndarray:
  if not path.exists():
    raise ValueError(f"{path} is missing (the run record lists it); copy the whole run directory")
  with path.open("rb") as f:
    compression = hashing.check_compression(np.load(f))
  if sha256 is not None and compression_sha256(compression) != sha256:
    raise ValueError(f"{path} does not match the sha256 in {RECORD_FILE} (the file was changed or damaged); "
                     "restore it from a copy of the run directory")
  return compression.astype(np.int32)


def _legacy_record(model_dir, config_json: dict) -> RunRecord:
  """A record for a run written before run_record.json existed (its compression map: the saved file, if any)."""
  config = model_config_from_dict(config_json)
  compression = None
  if config.engram_layers:
    candidates = [config_json.get("engram_compression_path"), model_dir / COMPRESSION_FILE]
    found = [fileio.as_path(p) for p in candidates if p and fileio.as_path(p).exists()]
    compression = _load_map(found[0], None) if found else hashing.identity_compression(config.vocab_size)
  return RunRecord(model_dir=str(model_dir), model_config=config, compression=compression,
                   hash_specs=model_hash_specs(config, compression), tokenizer_path=None, tokenizer_sha256=None,
                   task=None, data_dir=None, seq_len=None, run_config={})


def locate(path) -> tuple[Any, Any, int | None]:
  """(model dir, checkpoints dir, step or None = latest) for a MODEL_DIR, its checkpoints/ or checkpoints/<step>."""
  p = fileio.as_path(path)
  if p.name.isdigit() and (p.parent.name == "checkpoints" or (p.parent / ckpt_lib.CONFIG_FILE).exists()):
    return p.parent.parent, p.parent, int(p.name)
  if p.name == "checkpoints" or (p / ckpt_lib.CONFIG_FILE).exists():
    return p.parent, p, None
  if (p / RECORD_FILE).exists() or (p / "checkpoints").exists():
    return p, p / "checkpoints", None
  raise ValueError(f"{os.fspath(path)!r} holds no run (no {RECORD_FILE} or checkpoints/ there); pass a MODEL_DIR, "
                   "its checkpoints/ directory or checkpoints/<step>")


# ------------------------------------------------------------------------------------------------ load_model


def load_model(path, mesh=None):
  """(Decoder with the checkpoint's parameters and non-trainable state, RunRecord) from a MODEL_DIR, its
  checkpoints/ directory or checkpoints/<step> (default: the latest step). Arrays are placed on `mesh` by the
  model's sharding annotations, or on the first local device without a mesh. Nothing but the path is needed."""
  from flax import nnx
  from engram_jax import sharding
  from engram_jax.models.decoder import Decoder
  model_dir, ckpt_dir, step = locate(path)
  record = read_record(model_dir)
  if record is None:
    raise ValueError(f"{os.fspath(path)!r}: {model_dir} has no {RECORD_FILE} (and no checkpoints/"
                     f"{ckpt_lib.CONFIG_FILE} of an older run); was it written by engram_jax.train?")
  steps = ckpt_lib.finished_steps(ckpt_dir)
  if step is None:
    step = max(steps) if steps else None
  if step is None or step not in steps:
    raise ValueError(f"{os.fspath(path)!r}: no finished checkpoint{'' if step is None else f' {step}'} in {ckpt_dir} "
                     f"(steps there: {steps}); train first or pick one of those steps")
  with _x64(record.model_config):
    abstract = nnx.eval_shape(lambda: Decoder(record.model_config, mesh, compression=record.compression,
                                              rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    if mesh is None:
      single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      shardings = jax.tree.map(lambda _: single, {"params": nnx.to_pure_dict(params), "rest": nnx.to_pure_dict(rest)})
    else:
      shardings = {"params": nnx.to_pure_dict(sharding.state_shardings(params, mesh)),
                   "rest": nnx.to_pure_dict(sharding.state_shardings(rest, mesh))}
    target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          {"params": nnx.to_pure_dict(params), "rest": nnx.to_pure_dict(rest)}, shardings)
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir)
    try:
      restored = _restore_verified(checkpointer, step, steps, target)
    finally:
      checkpointer.close()
    nnx.replace_by_pure_dict(params, restored["params"])
    nnx.replace_by_pure_dict(rest, restored["rest"])
    model = nnx.merge(graphdef, params, rest)
  _check_restored_maps(model, record)
  return model, dataclasses.replace(record, step=int(step))


def _restore_verified(checkpointer, step: int, steps: list[int], target) -> dict:
  """The step's params and rest, after checking its manifest; a corrupt step is refused, naming the bad files."""
  from engram_jax import ckpt_integrity
  try:
    checkpointer.verify(step)
    try:
      return checkpointer.restore_subset(step, target)
    except Exception as e:  # orbax / tensorstore errors on truncated or missing files
      mismatch = ckpt_lib.shape_mismatch_error(checkpointer.directory, step, e)
      if mismatch is not None:
        raise mismatch from e
      raise ckpt_integrity.CorruptCheckpointError(
          f"checkpoint {checkpointer.directory / str(step)} could not be restored: {type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''}") from e
  except ckpt_integrity.CorruptCheckpointError as e:
    earlier = [s for s in steps if s < step]
    hint = (f"pass an earlier step, e.g. {checkpointer.directory / str(earlier[-1])}" if earlier
            else "no earlier step exists")
    raise ckpt_integrity.CorruptCheckpointError(f"{e}\nRefusing to load it. Fix: {hint}.") from None


def _check_restored_maps(model, record: RunRecord) -> None:
  """The compression map inside the checkpoint must be the recorded one (it decides which table rows are read)."""
  for i, block in enumerate(model.blocks):
    if block.engram is not None and not np.array_equal(np.asarray(block.engram.compression[...]), record.compression):
      raise ValueError(f"{record.model_dir}: the checkpoint's Engram compression map (layer {i}) differs from "
                       f"{COMPRESSION_FILE}; the run directory mixes files of different runs")
