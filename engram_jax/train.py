"""Training: a plain importable `train_and_evaluate(model_config, run, model_dir)` and a gin entry point.

    python -m engram_jax.train --gin_file=configs/experiments/quickstart.gin --gin.MODEL_DIR="'/tmp/quick'"

Letters: B batch, S sequence, V vocabulary, L MoE layers, E experts.

The state is a dict of pure pytrees {'params', 'opt', 'rest', 'step', 'rng'} ('rest' holds the model's
non-trainable variables, e.g. MoE balance biases); one jitted, donated `train_step` maps it to the next state.
Gin only wires the entry point (`main`); the library functions take plain dataclasses.

MODEL_DIR receives: config.gin (gin's operative config), checkpoints/ (orbax steps + model_config.json),
metrics.jsonl (one JSON record per log/eval step), tb/ (TensorBoard events), loss_curve.png and result.json.
A rerun with the same MODEL_DIR resumes from the latest checkpoint (parameters, optimizer state, step, RNG key,
data position); `RunConfig.stop_after` stops early without changing the learning-rate schedule.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from engram_jax import checkpoint as ckpt_lib
from engram_jax import hashing, optim, sharding
from engram_jax.models.config import ModelConfig

State = dict[str, Any]
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything about a run that is not the model: data, length, optimizer, cadence, mesh."""

  steps: int = 1000  # Total optimizer steps; the learning-rate schedule spans exactly these.
  batch_size: int = 16  # Global batch B (rows of S tokens); must divide over the mesh's data x expert devices.
  seq_len: int = 256
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig()
  eval_every: int = 100  # Validation loss every this many steps (and at the end).
  eval_batches: int = 8  # Validation batches per evaluation (the same batches every time).
  checkpoint_every: int = 500  # Also saved at the last step.
  keep_checkpoints: int = 3
  log_every: int = 10
  mesh: str = "data=-1"  # sharding.make_mesh spec over ('data', 'expert', 'model').
  seed: int = 0  # Model init, data order.
  compute_dtype: str | None = None  # 'bfloat16' / 'float32' overrides ModelConfig.compute_dtype; None keeps it.
  task: str = "engram_corpus_en"  # Data task (MIXTURE_OR_TASK_NAME).
  data_dir: str | None = None  # Corpus directory; None: $ENGRAM_DATA_DIR or ~/.cache/engram_jax/corpus.
  stop_after: int | None = None  # Stop (and checkpoint) at this step although the schedule spans `steps`.
  # Engram tokenizer compression (paper section 2.2) when ModelConfig.engram_compression_path is unset:
  # 'vocab' merges the task vocabulary's pieces that normalise alike and saves the map to
  # MODEL_DIR/engram_compression.npy; 'none' hashes raw ids (identity map).
  engram_compression: str = "vocab"

  def __post_init__(self):
    for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "checkpoint_every",
                 "keep_checkpoints", "log_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"RunConfig.{name}={getattr(self, name)} must be >= 1")
    if self.compute_dtype not in (None, "float32", "bfloat16"):
      raise ValueError(f"RunConfig.compute_dtype={self.compute_dtype!r}: use None, 'float32' or 'bfloat16'")
    if self.engram_compression not in ("vocab", "none"):
      raise ValueError(f"RunConfig.engram_compression={self.engram_compression!r}: use 'vocab' or 'none'")
    if self.stop_after is not None and not 0 < self.stop_after <= self.steps:
      raise ValueError(f"RunConfig.stop_after={self.stop_after} must be in [1, steps={self.steps}]")


# ------------------------------------------------------------------------------------------------ loss


def shift_right(targets: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Decoder inputs [B, S]: the previous token of the same document, 0 (pad, acting as BOS) at document starts."""
  prev = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]  # [B, S]
  prev_seg = jnp.pad(segment_ids, ((0, 0), (1, 0)))[:, :-1]  # [B, S]
  return jnp.where(prev_seg == segment_ids, prev, 0)


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted token NLL, sum of weights) for logits [B, S, V] and integer targets [B, S]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, S, V]
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, S]
  weights = weights.astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(weights)


def lm_terms(model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array, dict]:
  """Next-token NLL sum and token count over the non-pad positions of a packed batch, and the model's aux."""
  inputs = shift_right(batch["targets"], batch["segment_ids"])
  logits, aux = model(inputs, segment_ids=batch["segment_ids"], positions=batch["positions"])  # [B, S, V]
  nll, count = cross_entropy(logits, batch["targets"], batch["segment_ids"] > 0)
  return nll, count, aux


# ------------------------------------------------------------------------------------------------ model + state


def build_model(model_config: ModelConfig, mesh, seed: int) -> nnx.Module:
  from engram_jax.models.decoder import Decoder  # lazy: the decoder imports layers that may import more
  return Decoder(model_config, mesh, rngs=nnx.Rngs(jax.random.key(seed)))  # seed may be traced


COMPRESSION_FILE = "engram_compression.npy"


def vocabulary_compression(task: str, data_dir: str | None, vocab_size: int) -> np.ndarray:
  """Engram's compression map np.int32 [vocab_size] from the task's SentencePiece pieces; ids beyond the
  tokenizer's (model vocab padding) keep their own compressed ids."""
  from engram_jax.data import tasks
  vocab = tasks.get_vocabulary(task, data_dir)
  pieces = [vocab.tokenizer.id_to_piece(i) for i in range(vocab.tokenizer.get_piece_size())]
  compression = hashing.build_compression(pieces)
  extra = vocab_size - len(pieces)  # [V - pieces] unused model ids: fresh compressed ids
  return np.concatenate([compression, compression.max() + 1 + np.arange(max(extra, 0), dtype=np.int32)])


def resolve_compression(model_config: ModelConfig, run: RunConfig, model_dir: Path) -> ModelConfig:
  """The model config with engram_compression_path pointing at MODEL_DIR's map (built once, written atomically)."""
  if not model_config.engram_layers or model_config.engram_compression_path or run.engram_compression == "none":
    return model_config
  path = model_dir / COMPRESSION_FILE
  if not path.exists():  # every process writes the same bytes under its own temporary name, then renames
    compression = vocabulary_compression(run.task, run.data_dir, model_config.vocab_size)
    tmp = path.with_name(f".{path.name}.{jax.process_index()}.tmp")
    with open(tmp, "wb") as f:
      np.save(f, compression)
    os.replace(tmp, path)
    if jax.process_index() == 0:
      print(f"engram tokenizer compression: {compression.size} -> {hashing.compressed_vocab_size(compression)} ids "
            f"({100 * hashing.reduction_ratio(compression):.1f}% reduction) -> {path}", flush=True)
  return dataclasses.replace(model_config, engram_compression_path=str(path))


def _balance_update_fn(model_config: ModelConfig) -> Callable[[nnx.Module, dict], None] | None:
  """The MoE helper that moves balance biases from the observed expert load (None for dense models)."""
  if model_config.moe is None:
    return None
  from engram_jax.layers import moe
  rate = model_config.moe.bias_update_rate
  return lambda model, aux: moe.apply_balance_updates(model, aux, rate)


@dataclasses.dataclass
class Setup:
  """Everything compiled for one (model, optimizer, schedule length, mesh): reused across runs in a process."""
  graphdef: Any
  tx: optax.GradientTransformation
  labels: dict
  shardings: State  # NamedSharding per leaf of the state
  abstract: State  # ShapeDtypeStructs (with shardings) of the state: the restore target
  init: Callable[[jax.Array], State]  # jitted seed -> fresh state, created directly sharded
  train_step: Callable[[State, Batch], tuple[State, dict]]
  eval_step: Callable[[dict, dict, Batch], tuple[jax.Array, jax.Array]]


@functools.lru_cache(maxsize=4)
def make_setup(model_config: ModelConfig, optimizer: optim.OptimizerConfig, total_steps: int, mesh) -> Setup:
  """Abstract model -> shardings, optimizer, sharded initializer and jitted steps (compiled on first call)."""
  abstract_model = nnx.eval_shape(lambda: build_model(model_config, mesh, 0))
  graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
  labels = optim.param_labels(params)
  tx = optim.make_optimizer(optimizer, total_steps, labels)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  param_sh = nnx.to_pure_dict(sharding.state_shardings(params, mesh))
  shardings = {"params": param_sh, "opt": optim.opt_state_shardings(tx, nnx.to_pure_dict(params), param_sh, replicated),
               "rest": nnx.to_pure_dict(sharding.state_shardings(rest, mesh)), "step": replicated, "rng": replicated}

  def init(seed: jax.Array) -> State:
    model = build_model(model_config, mesh, seed)
    _, p, r = nnx.split(model, nnx.Param, ...)
    p = nnx.to_pure_dict(p)
    return {"params": p, "opt": tx.init(p), "rest": nnx.to_pure_dict(r), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.PRNGKey(seed)}

  init = jax.jit(init, out_shardings=shardings)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          jax.eval_shape(init, jnp.int32(0)), shardings)
  schedule = optim.learning_rate_schedule(optimizer, total_steps)
  train_step = make_train_step(graphdef, tx, _balance_update_fn(model_config), schedule)
  return Setup(graphdef, tx, labels, shardings, abstract, init,
               jax.jit(train_step, donate_argnums=0, out_shardings=(shardings, None)),
               jax.jit(make_eval_step(graphdef)))


# ------------------------------------------------------------------------------------------------ steps


def intermediates(model: nnx.Module) -> dict[str, jax.Array]:
  """Values the model recorded during the call as nnx.Intermediate, by dotted path (for logging)."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Intermediate))
  return {".".join(map(str, path)): var.get_value() for path, var in flat}


def make_train_step(graphdef, tx: optax.GradientTransformation, update_biases: Callable | None,
                    schedule: Callable) -> Callable[[State, Batch], tuple[State, dict]]:
  """The update: loss -> grads -> clipped optax groups -> MoE bias update (outside the gradient)."""

  def train_step(state: State, batch: Batch) -> tuple[State, dict]:
    def loss_fn(params):
      model = nnx.merge(graphdef, params, state["rest"])
      nll, count, aux = lm_terms(model, batch)
      ce = nll / jnp.maximum(count, 1.0)
      aux = {**aux, **intermediates(model)}  # what layers record, e.g. Engram ids dropped for capacity
      return ce + aux.get("moe_aux_loss", 0.0), (ce, count, aux)

    (loss, (ce, count, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    rest = state["rest"]
    if update_biases is not None:  # aux-loss-free balancing: no gradient flows here
      model = nnx.merge(graphdef, params, rest)
      update_biases(model, jax.lax.stop_gradient(aux))
      rest = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])
    metrics = {"loss": ce, "total_loss": loss, "tokens": count, "grad_norm": optax.global_norm(grads),
               "lr": schedule(state["step"]), **{f"aux/{k}": v for k, v in aux.items()}}
    new_state = {"params": params, "opt": opt, "rest": rest, "step": state["step"] + 1,
                 "rng": jax.random.split(state["rng"])[0]}  # the key advances every step (reserved for noise)
    return new_state, metrics

  return train_step


def make_eval_step(graphdef) -> Callable[[dict, dict, Batch], tuple[jax.Array, jax.Array]]:
  """(params, rest, batch) -> (NLL sum, token count)."""

  def eval_step(params, rest, batch):
    nll, count, _ = lm_terms(nnx.merge(graphdef, params, rest), batch)
    return nll, count

  return eval_step


def validation_loss(eval_step, state: State, batches: Sequence[dict]) -> float:
  """Token-weighted mean NLL over device batches."""
  sums = [eval_step(state["params"], state["rest"], b) for b in batches]
  nll, count = (float(sum(jax.device_get(s[i]) for s in sums)) for i in (0, 1))
  return nll / max(count, 1.0)


# ------------------------------------------------------------------------------------------------ data


def data_parallel_size(mesh) -> int:
  return math.prod(mesh.shape[a] for a in sharding.mesh_axes("batch") if a in mesh.shape)


def check_batch_size(batch_size: int, mesh, spec: str) -> None:
  n = data_parallel_size(mesh)
  if batch_size % n or batch_size % jax.process_count():
    raise ValueError(
        f"RunConfig.batch_size={batch_size} (BATCH_SIZE) is not divisible by the {n} data-parallel devices of mesh "
        f"{spec!r} (data x expert axes) or by the {jax.process_count()} processes; use a multiple of {n}, or change "
        "RunConfig.mesh.")


def open_data(run: RunConfig, vocab_size: int):
  """(resumable train iterator of this process's rows, the fixed list of validation batches) for `run.task`.

  The corpus is prepared on first use (engram_jax.data.prepare.ensure_corpus); its errors pass through unchanged.
  """
  from engram_jax.data import tasks  # imports TensorFlow (CPU only): never at library import time
  data_vocab = tasks.get_vocabulary(run.task, run.data_dir).vocab_size
  if data_vocab > vocab_size:
    raise ValueError(f"task {run.task!r} has a vocabulary of {data_vocab} ids but ModelConfig.vocab_size="
                     f"{vocab_size}; set ModelConfig.vocab_size >= {data_vocab}")
  local_batch = run.batch_size // jax.process_count()
  common = dict(task_name=run.task, seq_len=run.seq_len, batch_size=local_batch, data_dir=run.data_dir,
                shard_index=jax.process_index(), num_shards=jax.process_count())
  train_iter = tasks.get_dataset(split="train", seed=run.seed, **common)
  val_iter = tasks.get_dataset(split="validation", seed=0, num_epochs=1, drop_remainder=False, **common)
  val_batches = [b for _, b in zip(range(run.eval_batches), val_iter)]
  if jax.process_count() > 1:  # every process must run the same number of (collective) eval steps
    from jax.experimental import multihost_utils
    counts = multihost_utils.process_allgather(np.int32(len(val_batches)))
    val_batches = val_batches[:int(np.min(counts))]
  if not val_batches:
    raise ValueError(f"task {run.task!r}: the validation split yields no batch of {local_batch} x {run.seq_len} "
                     "tokens per process; lower RunConfig.batch_size / seq_len or use a larger validation split")
  return train_iter, val_batches


def to_global(batch: Batch, mesh) -> dict[str, jax.Array]:
  """This process's rows [B / processes, S] -> global arrays [B, S] sharded over the data axes."""
  sh = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v, np.int32)) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------ logging


class Logger:
  """One place for the console line, metrics.jsonl and TensorBoard events."""

  def __init__(self, model_dir: Path, enabled: bool):
    self.enabled = enabled
    self.writer = None
    if enabled:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(str(model_dir / "tb"))
      self.jsonl = open(model_dir / "metrics.jsonl", "a")

  def write(self, step: int, record: dict[str, Any], console: str | None = None) -> None:
    if not self.enabled:
      return
    if console:
      print(console, flush=True)
    self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
    self.jsonl.flush()
    for key, value in record.items():
      arr = None if value is None or isinstance(value, str) else np.asarray(value, dtype=np.float64)
      if arr is None:
        continue
      if arr.ndim == 0:
        self.writer.add_scalar(key, float(arr), step)
      else:
        self.writer.add_histogram(key, arr.reshape(-1), step)
        self.writer.add_scalar(key + "/mean", float(arr.mean()), step)

  def close(self) -> None:
    if self.enabled:
      self.writer.close()
      self.jsonl.close()


def summarize(metrics: list[dict]) -> dict[str, Any]:
  """Device metrics of several steps -> means (arrays kept as lists); expert load -> max/mean ratio too."""
  host = jax.device_get(metrics)
  out = {}
  for key in host[0]:
    if np.size(host[0][key]) == 0:  # e.g. a dense model's empty expert load
      continue
    values = np.mean([np.asarray(m[key], np.float64) for m in host], axis=0)
    out[key] = values.tolist() if np.ndim(values) else float(values)
    if key == "aux/expert_load" and np.ndim(values) == 2:  # [L, E] fractions
      out["aux/max_over_mean_load"] = float(np.mean(values.max(-1) / np.maximum(values.mean(-1), 1e-9)))
  return out


def _moe_engram_text(record: dict) -> str:
  """' | load max/mean 1.31 | gate 0.47' when the model has MoE / Engram layers."""
  text = ""
  if "aux/max_over_mean_load" in record:
    text += f" | load max/mean {record['aux/max_over_mean_load']:.2f}"
  if "aux/engram_gate_mean" in record:
    text += f" | gate {np.mean(record['aux/engram_gate_mean']):.2f}"
  return text


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
      f"{seconds // 60}m{seconds % 60:02d}s"


def plot_curves(path: Path, train_curve: list[tuple[int, float]], val_curve: list[tuple[int, float]], title: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  if train_curve:
    ax.plot(*zip(*train_curve), label="train", alpha=0.7)
  if val_curve:
    ax.plot(*zip(*val_curve), "o-", label="validation")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ------------------------------------------------------------------------------------------------ main loop


def train_and_evaluate(model_config: ModelConfig, run: RunConfig, model_dir: str | os.PathLike) -> dict[str, Any]:
  """Trains (resuming from model_dir's latest checkpoint) and returns losses, curves, tokens and wall time."""
  t_start = time.time()
  model_dir = Path(model_dir)
  model_dir.mkdir(parents=True, exist_ok=True)
  if run.compute_dtype:
    model_config = dataclasses.replace(model_config, compute_dtype=run.compute_dtype)
  chief = jax.process_index() == 0

  # --- mesh and input checks (before anything compiles)
  mesh = sharding.make_mesh(run.mesh)
  check_batch_size(run.batch_size, mesh, run.mesh)
  checkpointer = ckpt_lib.Checkpointer(model_dir / "checkpoints", max_to_keep=run.keep_checkpoints)
  checkpointer.check_model_config(model_config)

  # --- data
  train_iter, val_batches = open_data(run, model_config.vocab_size)
  val_batches = [to_global(b, mesh) for b in val_batches]
  model_config = resolve_compression(model_config, run, model_dir)

  # --- model, optimizer, state (created sharded, or restored)
  setup = make_setup(model_config, run.optimizer, run.steps, mesh)
  start = checkpointer.latest_step()
  if start is None:
    state, start = setup.init(jnp.int32(run.seed)), 0
  else:
    state, data_position = checkpointer.restore(start, setup.abstract)
    train_iter.restore(data_position)
  train_step, eval_step = setup.train_step, setup.eval_step
  sizes = optim.group_sizes(setup.labels, setup.abstract["params"])
  logger = Logger(model_dir, chief)
  if chief:
    print(f"model_dir {model_dir} | mesh {dict(mesh.shape)} | params {sizes} | start step {start}", flush=True)

  # --- loop
  stop = run.stop_after or run.steps
  tokens_per_step = run.batch_size * run.seq_len
  train_curve, val_curve, pending = [], [], []
  if start == 0:  # the untrained model's validation loss anchors the curve
    val = validation_loss(eval_step, state, val_batches)
    val_curve.append((0, val))
    logger.write(0, {"val_loss": val}, f"step 0/{stop} | validation loss {val:.4f}")
  t_window, steps_window, t_loop = time.time(), 0, time.time()
  t_compiled = t_loop
  step = start
  while step < stop:
    batch = to_global(next(train_iter), mesh)
    state, metrics = train_step(state, batch)
    step += 1
    pending.append(metrics)
    steps_window += 1
    if step == start + 1:  # the first step compiles: keep it out of the throughput and ETA
      jax.block_until_ready(metrics)
      if chief:
        print(f"first step (compile + run) {time.time() - t_loop:.1f} s", flush=True)
      t_window, steps_window, t_compiled = time.time(), 0, time.time()
    if step % run.log_every == 0 or step == stop:
      record = summarize(pending)
      elapsed = time.time() - t_window
      record["tokens_per_s"] = steps_window * tokens_per_step / max(elapsed, 1e-9) if steps_window else None
      eta = (stop - step) * elapsed / max(steps_window, 1)
      train_curve.append((step, record["loss"]))
      logger.write(step, record, f"step {step}/{stop} | loss {record['loss']:.4f} | "
                   f"{record['tokens_per_s'] or 0:,.0f} tok/s | lr {record['lr']:.2e}{_moe_engram_text(record)} | "
                   f"elapsed {_duration(time.time() - t_loop)} | ETA {_duration(eta)}")
      pending, t_window, steps_window = [], time.time(), 0
    if step % run.eval_every == 0 or step == stop:
      val = validation_loss(eval_step, state, val_batches)
      val_curve.append((step, val))
      logger.write(step, {"val_loss": val, "val_perplexity": math.exp(min(val, 50.0))},
                   f"step {step}/{stop} | validation loss {val:.4f} | perplexity {math.exp(min(val, 50.0)):.1f}")
      t_window = time.time()  # evaluation time is not training throughput
    if step % run.checkpoint_every == 0 or step == stop:
      checkpointer.save(step, state, train_iter.state())

  # --- wrap up
  t_end = time.time()
  if not val_curve or val_curve[-1][0] != step:  # e.g. nothing left to train: still report the final loss
    val = validation_loss(eval_step, state, val_batches)
    val_curve.append((step, val))
    logger.write(step, {"val_loss": val, "val_perplexity": math.exp(min(val, 50.0))})
  checkpointer.close()
  logger.close()
  if chief:  # curves over every session of this model_dir (a resumed run continues the file)
    train_curve, val_curve = read_curves(model_dir / "metrics.jsonl")
  trained = step - start
  result = {"final_val_loss": val_curve[-1][1], "val_curve": val_curve, "train_curve": train_curve,
            "steps": step, "start_step": start, "tokens": step * tokens_per_step,
            "wall_time_s": time.time() - t_start,
            "tokens_per_s": (trained - 1) * tokens_per_step / max(t_end - t_compiled, 1e-9) if trained > 1 else None,
            "param_groups": sizes, "model_dir": str(model_dir)}
  if chief:
    plot_curves(model_dir / "loss_curve.png", train_curve, val_curve, model_dir.name)
    (model_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
  return result


def read_curves(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
  """(train, validation) loss curves from metrics.jsonl; a step logged twice (after a resume) keeps its last value."""
  train, val = {}, {}
  if path.exists():
    for line in path.read_text().splitlines():
      rec = json.loads(line)
      if "loss" in rec:
        train[rec["step"]] = rec["loss"]
      if "val_loss" in rec:
        val[rec["step"]] = rec["val_loss"]
  return sorted(train.items()), sorted(val.items())


# ------------------------------------------------------------------------------------------------ entry point


def parse_flags(argv: Sequence[str]) -> tuple[list[str], list[str], argparse.Namespace]:
  """--gin_file (repeatable) and --gin.NAME=VALUE overrides -> (files, bindings, other flags)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable, applied in order)")
  parser.add_argument("--gin_search_path", action="append", default=[], help="extra directory for gin includes")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() first (multi-host / multi-process)")
  args, rest = parser.parse_known_args(argv)
  bindings = []
  for item in rest:
    if not item.startswith("--gin."):
      parser.error(f"unrecognized argument {item!r}; overrides look like --gin.TRAIN_STEPS=100")
    name, sep, value = item[len("--gin."):].partition("=")
    if not sep:
      parser.error(f"{item!r}: expected --gin.NAME=VALUE")
    bindings.append(f"{name} = {_gin_value(value)}")
  if not args.gin_file:
    parser.error("at least one --gin_file is required (e.g. configs/experiments/quickstart.gin)")
  return args.gin_file, bindings, args


def _gin_value(value: str) -> str:
  """Values that are not gin literals or references (e.g. a bare path) are quoted as strings."""
  import ast
  v = value.strip()
  if v[:1] in "@%([{'\"" or v in ("True", "False", "None"):
    return v
  try:
    ast.literal_eval(v)
    return v
  except (ValueError, SyntaxError):
    return repr(v)


def initialize_distributed() -> None:
  """jax.distributed.initialize from ENGRAM_COORDINATOR / ENGRAM_NUM_PROCESSES / ENGRAM_PROCESS_ID when set (local
  multi-process, see launch/multiprocess.py; CPU processes talk through gloo), else auto-detection (Cloud TPU)."""
  if "ENGRAM_COORDINATOR" in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=os.environ["ENGRAM_COORDINATOR"],
                               num_processes=int(os.environ["ENGRAM_NUM_PROCESSES"]),
                               process_id=int(os.environ["ENGRAM_PROCESS_ID"]))
  else:
    jax.distributed.initialize()


def main(argv: Sequence[str] | None = None) -> dict:
  gin_files, bindings, args = parse_flags(sys.argv[1:] if argv is None else argv)
  from engram_jax import configurables  # registers the library's classes with gin
  if args.distributed:
    initialize_distributed()
  model_config, run, model_dir = configurables.resolve("train", gin_files, bindings, args.gin_search_path)
  configurables.write_operative_config(model_dir)
  return train_and_evaluate(model_config, run, model_dir)


if __name__ == "__main__":  # run the importable module's main, so gin and the caches see a single copy
  from engram_jax import train as _entry
  _entry.main()
