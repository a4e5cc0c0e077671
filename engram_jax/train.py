"""Training: a plain importable `train_and_evaluate(model_config, run, model_dir)` and a gin entry point.

    python -m engram_jax.train --gin_file=configs/experiments/quickstart.gin --gin.MODEL_DIR="'/tmp/quick'"

Letters: B batch, S sequence, V vocabulary, L MoE layers, E experts.

The compiled pieces (state, train and eval steps) live in steps.py, batches in data/feed.py, logging in
metrics_io.py. Gin only wires the entry point (`main`); the library functions take plain dataclasses.

MODEL_DIR receives: run_record.json (+ engram_compression.npy, tokenizer.model: everything needed to rebuild the
model, see run_dir.py), config.gin (gin's operative config), checkpoints/ (orbax steps), metrics.jsonl (one JSON
record per log/eval step), tb/ (TensorBoard events), loss_curve.png and result.json. Nothing is written before the
configuration, the mesh and the data have been checked.
A rerun with the same MODEL_DIR resumes from the latest checkpoint (parameters, optimizer state, step, RNG key,
data position); `RunConfig.stop_after` stops early without changing the learning-rate schedule.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax import checkpoint as ckpt_lib
from engram_jax import cli, fileio, optim, run_dir, sharding
from engram_jax.data.feed import check_batch_size, open_data, resolved_data_dir, task_vocabulary, to_global
from engram_jax.metrics_io import Logger, moe_engram_text, duration, plot_curves, read_curves, summarize
from engram_jax.models.config import ModelConfig
from engram_jax.models.decoder import validate_config
from engram_jax.run_config import RunConfig
from engram_jax.steps import make_setup, validation_loss


# ------------------------------------------------------------------------------------------------ main loop


def train_and_evaluate(model_config: ModelConfig, run: RunConfig, model_dir: str | os.PathLike, *,
                       operative_config: str | None = None) -> dict[str, Any]:
  """Trains (resuming from model_dir's latest checkpoint) and returns losses, curves, tokens and wall time.
  `operative_config` (gin's text) is saved as MODEL_DIR/config.gin once the checks have passed."""
  with run_dir.x64_context(model_config):  # 64-bit Engram hashing needs jax x64 (EngramConfig.hash_bits)
    return _train_and_evaluate(model_config, run, model_dir, operative_config)


def _train_and_evaluate(model_config: ModelConfig, run: RunConfig, model_dir: str | os.PathLike,
                        operative_config: str | None) -> dict[str, Any]:
  t_start = time.time()
  model_dir = Path(model_dir)
  if run.compute_dtype:
    model_config = dataclasses.replace(model_config, compute_dtype=run.compute_dtype)
  chief = jax.process_index() == 0

  # --- checks before anything is written or compiled: mesh, batch, model config
  mesh = sharding.make_mesh(run.mesh)
  check_batch_size(run.batch_size, mesh, run.mesh)
  validate_config(model_config, mesh)
  if model_dir.exists() and not model_dir.is_dir():
    raise ValueError(f"MODEL_DIR={str(model_dir)!r} is a file; pass a directory (new or of an earlier run)")

  # --- data
  train_iter, val_batches = open_data(run, model_config.vocab_size)
  val_batches = [to_global(b, mesh) for b in val_batches]

  # --- the run record: model, Engram compression map (data, not config), tokenizer. Built abstractly and checked
  # against MODEL_DIR's record before anything is written there; then model, optimizer, jitted steps (compiled on
  # first call, once per process for every MODEL_DIR of this model shape)
  has_checkpoints = bool(ckpt_lib.finished_steps(model_dir / "checkpoints"))
  record = run_dir.begin_run(model_dir, model_config, run, task_vocabulary(run), resolved_data_dir(run),
                             has_checkpoints, mesh)
  setup = make_setup(model_config, run.optimizer, run.steps, mesh, record.compression)
  checkpointer = ckpt_lib.Checkpointer(model_dir / "checkpoints", max_to_keep=run.keep_checkpoints)
  start = checkpointer.latest_step()
  if chief and operative_config is not None:
    save_operative_config(model_dir, operative_config, start or 0)
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

  # --- in-loop benchmarks (optional: the evals package is imported only when RunConfig.inloop_tasks names tasks)
  inloop = None
  if run.inloop_tasks and chief:
    if record.tokenizer_path is None:
      raise ValueError(f"RunConfig.inloop_tasks needs the task's SentencePiece model in MODEL_DIR; task {run.task!r} "
                       "has none (set inloop_tasks=())")
    from evals.inloop import InLoopEval
    inloop = InLoopEval(tuple(run.inloop_tasks), record.tokenizer_path, run.seq_len, limit=run.inloop_limit,
                        batch_size=run.batch_size)

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
                   f"{record['tokens_per_s'] or 0:,.0f} tok/s | lr {record['lr']:.2e}{moe_engram_text(record)} | "
                   f"elapsed {duration(time.time() - t_loop)} | ETA {duration(eta)}")
      pending, t_window, steps_window = [], time.time(), 0
    if step % run.eval_every == 0 or step == stop:
      val = validation_loss(eval_step, state, val_batches)
      val_curve.append((step, val))
      logger.write(step, {"val_loss": val, "val_perplexity": math.exp(min(val, 50.0))},
                   f"step {step}/{stop} | validation loss {val:.4f} | perplexity {math.exp(min(val, 50.0)):.1f}")
      t_window = time.time()  # evaluation time is not training throughput
    if inloop is not None and (step % run.inloop_every == 0 or step == stop):
      scores = inloop(nnx.merge(setup.graphdef, state["params"], state["rest"]))
      logger.write(step, scores, f"step {step}/{stop} | in-loop " + " | ".join(
          f"{k[5:]} {v:.3f}" for k, v in scores.items() if k != "eval/seconds"))
      t_window = time.time()
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
    print(f"evaluate: python -m evals.run --gin.CHECKPOINT_PATH=\"'{model_dir}'\" --gin.SUITE=quick "
          "(or SUITE=standard / engram_off / analysis; see README, Evaluate)", flush=True)
  return result


def save_operative_config(model_dir: Path, text: str, start: int) -> None:
  """config.gin for the first session; a resumed session whose config differs gets config_step<start>.gin."""
  path = model_dir / "config.gin"
  if start and path.exists() and path.read_text() != text:
    path = model_dir / f"config_step{start}.gin"
  if not (start and path.exists()):
    fileio.atomic_write(path, text)


def main(argv: Sequence[str] | None = None) -> dict:
  gin_files, bindings, args = cli.parse_flags(sys.argv[1:] if argv is None else argv, __doc__.split("\n")[0])
  from engram_jax import configurables  # registers the library's classes with gin
  if args.distributed:
    cli.initialize_distributed()
  model_config, run, model_dir = configurables.resolve("train", gin_files, bindings, args.gin_search_path)
  return train_and_evaluate(model_config, run, model_dir, operative_config=configurables.operative_config())


if __name__ == "__main__":  # run the importable module's main, so gin and the caches see a single copy
  from engram_jax import train as _entry
  _entry.main()
