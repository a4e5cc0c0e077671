"""Training: a plain importable `train_and_evaluate(model_config, run, model_dir)` and a gin entry point.

    python -m engram_jax.train --gin_file=configs/experiments/quickstart.gin --gin.MODEL_DIR="'/tmp/quick'"

Letters: B batch, S sequence, V vocabulary, L MoE layers, E experts.

The compiled pieces (state, train and eval steps) live in steps.py, batches in data/feed.py, logging in
metrics_io.py. Gin only wires the entry point (`main`); the library functions take plain dataclasses.

MODEL_DIR receives: config.gin (gin's operative config), checkpoints/ (orbax steps + model_config.json),
metrics.jsonl (one JSON record per log/eval step), tb/ (TensorBoard events), loss_curve.png and result.json.
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
import numpy as np

from engram_jax import checkpoint as ckpt_lib
from engram_jax import cli, hashing, optim, sharding
from engram_jax.data.feed import check_batch_size, open_data, to_global
from engram_jax.metrics_io import Logger, moe_engram_text, duration, plot_curves, read_curves, summarize
from engram_jax.models.config import ModelConfig
from engram_jax.run_config import RunConfig
from engram_jax.steps import make_setup, validation_loss


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
                   f"{record['tokens_per_s'] or 0:,.0f} tok/s | lr {record['lr']:.2e}{moe_engram_text(record)} | "
                   f"elapsed {duration(time.time() - t_loop)} | ETA {duration(eta)}")
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


def main(argv: Sequence[str] | None = None) -> dict:
  gin_files, bindings, args = cli.parse_flags(sys.argv[1:] if argv is None else argv, __doc__.split("\n")[0])
  from engram_jax import configurables  # registers the library's classes with gin
  if args.distributed:
    cli.initialize_distributed()
  model_config, run, model_dir = configurables.resolve("train", gin_files, bindings, args.gin_search_path)
  configurables.write_operative_config(model_dir)
  return train_and_evaluate(model_config, run, model_dir)


if __name__ == "__main__":  # run the importable module's main, so gin and the caches see a single copy
  from engram_jax import train as _entry
  _entry.main()
