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
data position); `RunConfig.stop_after` stops early without changing the learning-rate schedule. A new MODEL_DIR with
`RunConfig.init_from` / `init_step` starts as a cooldown branch of another run's checkpoint (engram_jax.branch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax import checkpoint as ckpt_lib
from engram_jax import branch, cli, fileio, guard, host_training, optim, run_dir
from engram_jax.config_checks import check_types
from engram_jax.data.feed import (check_batch_size, make_mesh, open_data, resolved_data_dir, task_vocabulary,
                                  to_global)
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
  model_dir = fileio.as_path(model_dir)  # local or gs:// (etils.epath)
  if run.compute_dtype:
    model_config = dataclasses.replace(model_config, compute_dtype=run.compute_dtype)
  chief = jax.process_index() == 0

  # --- checks before anything is written or compiled: types, mesh, batch, model config, the checkpoint to resume
  check_types(model_config)
  host = host_training.uses_host_tables(model_config)  # Engram tables in host memory (host_training.py)
  mesh = make_mesh(run.mesh, host_training.mesh_devices(run.mesh) if host else None)
  check_batch_size(run.batch_size, mesh, run.mesh)
  validate_config(model_config, mesh)
  if host:
    host_training.check_config(model_config, run.optimizer, mesh, run.inloop_tasks)
  for warning in run.warnings() if chief else ():
    print(f"warning: {warning}", flush=True)
  if model_dir.exists() and not model_dir.is_dir():
    raise ValueError(f"MODEL_DIR={str(model_dir)!r} is a file; pass a directory (new or of an earlier run)")
  saved_steps = ckpt_lib.finished_steps(model_dir / "checkpoints")
  check_resume(saved_steps, run, model_dir)
  source = branch.check_source(run, model_config, model_dir) if run.init_from and not saved_steps else None

  # --- data
  train_iter, val_batches = open_data(run, model_config.vocab_size)
  val_batches = [to_global(b, mesh) for b in val_batches]

  # --- the run record: model, Engram compression map (data, not config), tokenizer. Built abstractly and checked
  # against MODEL_DIR's record before anything is written there; then model, optimizer, jitted steps (compiled on
  # first call, once per process for every MODEL_DIR of this model shape)
  record = run_dir.begin_run(model_dir, model_config, run, task_vocabulary(run), resolved_data_dir(run),
                             bool(saved_steps), mesh)
  if source is not None:
    run_dir.check_compatible(source, record)  # same compression map and hash as the source run
  setup = (host_training.make_host_setup if host else make_setup)(model_config, run.optimizer, run.steps, mesh,
                                                                   record.compression, run.on_nonfinite)

  # --- state: restored from the latest good checkpoint, or created sharded
  checkpointer = ckpt_lib.Checkpointer(model_dir / "checkpoints", max_to_keep=run.keep_checkpoints)
  restored = checkpointer.restore_latest(setup.abstract)
  if restored is None and source is not None:  # a new cooldown branch: the source's state at init_step
    (state, data_position), start = branch.restore_source(run, setup.abstract), run.init_step
    train_iter.restore(data_position)
  elif restored is None:
    state, start = setup.init(jnp.int32(run.seed)), 0
  else:
    state, data_position, start = restored
    train_iter.restore(data_position)
  if host and (restored is not None or source is not None):
    state = setup.adopt(state)  # host leaves: restored on the CPU device -> numpy tables updated in place
  if host:
    train_iter = setup.feed(train_iter)  # one batch ahead: hashed and gathered on the host while the device runs
  stop = run.stop_after or run.steps
  if chief and operative_config is not None:
    save_operative_config(model_dir, operative_config, start)
  sizes = optim.group_sizes(setup.labels, setup.abstract["params"])
  logger = Logger(model_dir, chief)
  if chief:
    session = ("new run" if not start else f"new branch of {run.init_from} at step {start}" if source else f"already complete at step {start}" if start >= stop
               else f"resumed from step {start}")
    print(f"model_dir {model_dir} | {session} | mesh {dict(mesh.shape)} | params {sizes} | "
          f"{len(val_batches)} validation batches", flush=True)

  # --- in-loop benchmarks (optional: the evals package is imported only when RunConfig.inloop_tasks names tasks)
  inloop = None
  if run.inloop_tasks and chief:
    if record.tokenizer_path is None:
      raise ValueError(f"RunConfig.inloop_tasks needs the task's SentencePiece model in MODEL_DIR; task {run.task!r} "
                       "has none (set inloop_tasks=())")
    from evals.inloop import InLoopEval
    inloop = InLoopEval(tuple(run.inloop_tasks), record.tokenizer_path, run.seq_len, limit=run.inloop_limit,
                        batch_size=run.batch_size)

  # --- loop (every exit path waits for in-flight saves and closes the logs)
  tokens_per_step = run.batch_size * run.seq_len
  pending, skipped, val = [], 0, None  # pending: (step, device metrics) since the last log line
  step, t_loop = start, time.time()
  t_window, steps_window, t_compiled = t_loop, 0, t_loop
  try:
    if start == 0 or (source is not None and start < stop):  # the starting model's loss anchors the curve
      val = validation_loss(setup.eval_step, state, val_batches)
      logger.write(start, {"val_loss": val}, f"step {start}/{stop} | validation loss {val:.4f}")
    elif start >= stop:  # nothing to train: report the final loss (logged only if an earlier session did not)
      val = validation_loss(setup.eval_step, state, val_batches)
      if dict(read_curves(model_dir / "metrics.jsonl")[1]).get(start) is None:
        logger.write(start, {"val_loss": val, "val_perplexity": math.exp(min(val, 50.0))})
    while step < stop:
      batch = next(train_iter) if host else to_global(next(train_iter), mesh)
      state, metrics = setup.train_step(state, batch)
      step += 1
      pending.append((step, metrics))
      steps_window += 1
      if step == start + 1:  # the first step compiles: keep it out of the throughput and ETA
        jax.block_until_ready(metrics)
        if chief:
          print(f"first step (compile + run) {time.time() - t_loop:.1f} s", flush=True)
        t_window, steps_window, t_compiled = time.time(), 0, time.time()
      if step % run.log_every == 0 or step == stop:
        good = check_finite(pending, run, setup)  # the guard's flags, read where logging syncs anyway
        skipped += len(pending) - len(good)
        if good:
          record = summarize([m for _, m in good])
          elapsed = time.time() - t_window
          record["tokens_per_s"] = steps_window * tokens_per_step / max(elapsed, 1e-9) if steps_window else None
          eta = (stop - step) * elapsed / max(steps_window, 1)
          logger.write(step, record, f"step {step}/{stop} | loss {record['loss']:.4f} | "
                       f"{record['tokens_per_s'] or 0:,.0f} tok/s | lr {record['lr']:.2e}{moe_engram_text(record)} | "
                       f"elapsed {duration(time.time() - t_loop)} | ETA {duration(eta)}")
        pending, t_window, steps_window = [], time.time(), 0
      if step % run.eval_every == 0 or step == stop:
        val = validation_loss(setup.eval_step, state, val_batches)
        logger.write(step, {"val_loss": val, "val_perplexity": math.exp(min(val, 50.0))},
                     f"step {step}/{stop} | validation loss {val:.4f} | perplexity {math.exp(min(val, 50.0)):.1f}")
        t_window = time.time()  # evaluation time is not training throughput
      if inloop is not None and (step % run.inloop_every == 0 or step == stop):
        scores = inloop(nnx.merge(setup.graphdef, state["params"], state["rest"]))
        logger.write(step, scores, f"step {step}/{stop} | in-loop " + " | ".join(
            f"{k[5:]} {v:.3f}" for k, v in scores.items() if k != "eval/seconds"))
        t_window = time.time()
      if step % run.checkpoint_every == 0 or step == stop:
        if run.on_nonfinite == "stop":
          check_finite(pending, run, setup)
        check_state_finite(setup.device_state(state) if host else state, step)  # a non-finite state is never saved
        checkpointer.save(step, setup.checkpoint_state(state, step) if host else state, train_iter.state())
    t_end = time.time()
  except guard.NonFiniteError as e:
    checkpointer.close()  # the saves in flight are good: let them finish
    if chief:
      write_result(model_dir, {"status": "stopped: non-finite", "error": str(e), "steps": step,
                               "last_good_checkpoint": max(ckpt_lib.finished_steps(model_dir / "checkpoints"),
                                                           default=None)})
    raise
  finally:
    checkpointer.close()
    logger.close()
    if host:
      setup.close()

  # --- wrap up: curves over every session of this MODEL_DIR, the final loss, result.json
  train_curve, val_curve = read_curves(model_dir / "metrics.jsonl") if chief else ([], [(step, val)])
  trained = step - start
  throughput = (trained - 1) * tokens_per_step / max(t_end - t_compiled, 1e-9) if trained > 1 else None
  result = {"status": "complete" if step >= run.steps else "stopped at stop_after",
            "final_val_loss": val, "val_curve": val_curve,
            "train_curve": train_curve, "steps": step, "start_step": start, "tokens": step * tokens_per_step,
            "wall_time_s": time.time() - t_start, "tokens_per_s": throughput, "skipped_nonfinite_steps": skipped,
            "val_batches": len(val_batches), "param_groups": sizes, "model_dir": str(model_dir)}
  if chief:
    if throughput is None:  # nothing (or one step) trained now: keep the throughput an earlier session measured
      result["tokens_per_s"] = previous_result(model_dir).get("tokens_per_s")
    plot_curves(model_dir / "loss_curve.png", train_curve, val_curve, model_dir.name)
    write_result(model_dir, result)
    print(f"evaluate: python -m evals.run --gin.CHECKPOINT_PATH=\"'{model_dir}'\" --gin.SUITE=quick "
          "(or SUITE=standard / engram_off / analysis; see README, Evaluate)", flush=True)
  return result


# ------------------------------------------------------------------------------------------------ helpers


def check_resume(saved_steps: list[int], run: RunConfig, model_dir) -> None:
  """A checkpoint beyond TRAIN_STEPS belongs to a longer schedule: refuse before anything is written."""
  if saved_steps and max(saved_steps) > run.steps:
    raise ValueError(f"MODEL_DIR={str(model_dir)!r} holds a checkpoint at step {max(saved_steps)}, beyond "
                     f"RunConfig.steps={run.steps} (TRAIN_STEPS): its learning-rate schedule spans more steps. Fix: "
                     f"rerun with TRAIN_STEPS >= {max(saved_steps)} (the run's own value is in config.gin), or use "
                     "a new MODEL_DIR (e.g. for a smoke test).")


def check_finite(pending: list[tuple[int, dict]], run: RunConfig, setup) -> list[tuple[int, dict]]:
  """The pending steps that were finite. A non-finite one raises guard.NonFiniteError ('stop') or is reported
  and left out of the logged means ('skip_step'; its update was not applied)."""
  bad = guard.nonfinite_steps([s for s, _ in pending], [m for _, m in pending])
  for step, host in bad:
    text = guard.describe(step, host, setup.abstract["params"], setup.labels)
    if run.on_nonfinite == "stop":
      raise guard.NonFiniteError(
          f"non-finite training {text}. Stopped without saving it; the checkpoints already saved are good. Fix: "
          "lower OptimizerConfig.learning_rate (or raise warmup_steps / grad_clip_norm), check the data, or set "
          "RunConfig.on_nonfinite='skip_step' to skip such steps.")
    if jax.process_index() == 0:
      print(f"skipped non-finite {text} (RunConfig.on_nonfinite='skip_step')", flush=True)
  bad_steps = {s for s, _ in bad}
  return [(s, m) for s, m in pending if s not in bad_steps]


def check_state_finite(state, step: int) -> None:
  bad = guard.bad_state_entries(state, guard.state_leaf_flags(state))
  if bad:
    raise guard.NonFiniteError(f"the train state at step {step} holds non-finite values in {bad[:6]}; not saved. "
                               "Fix: resume from the last good checkpoint with a lower learning rate.")


def previous_result(model_dir) -> dict:
  try:
    return json.loads((model_dir / "result.json").read_text())
  except (OSError, ValueError):
    return {}


def write_result(model_dir, result: dict) -> None:
  """result.json, atomically; non-finite numbers become null (JSON has no NaN)."""
  fileio.write_json(model_dir / "result.json", fileio.finite_json(result))


def save_operative_config(model_dir, text: str, start: int) -> None:
  """config.gin for the first session; a resumed session whose config differs gets config_step<start>.gin."""
  path = model_dir / "config.gin"
  if start and path.exists() and path.read_text() != text:
    path = model_dir / f"config_step{start}.gin"
  if not (start and path.exists()):
    fileio.atomic_write(path, text)


def main(argv: Sequence[str] | None = None) -> dict:
  """python -m engram_jax.train (flags and --help: engram_jax.cli.TRAIN)."""
  from engram_jax import configurables  # gin: entry points only

  def train(model_config, run, model_dir):
    return train_and_evaluate(model_config, run, model_dir, operative_config=configurables.operative_config())

  return cli.run(cli.TRAIN, argv, train)


if __name__ == "__main__":  # run the importable module's main, so gin and the caches see a single copy
  from engram_jax import train as _entry
  _entry.main()
