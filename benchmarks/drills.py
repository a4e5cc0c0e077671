"""Crash drills: `kill -9` a training process at random moments, resume it, and check the result is bit-identical.

    nice -n 10 .venv/bin/python benchmarks/drills.py [--trials 10] [--kills 2] [--steps 60] [--seed 0]

Not part of the test suite (it runs for tens of minutes). One tiny Engram+MoE model trains on a toy corpus built
here, on one CPU device, in a child process (`--worker`), checkpointing asynchronously every --checkpoint-every
steps; the sessions share a JAX persistent compilation cache (the same executables, loaded instead of compiled).
First one uninterrupted run fills the cache; a second gives the reference and the horizon H (its wall time from
the first training step to the end: steps, evaluations and saves; start-up comes before). Then each trial runs the same
training in a fresh MODEL_DIR and kills it --kills times with SIGKILL, resuming after each:
  * 'time' kills fire at a moment drawn uniformly from [0, 0.6 H] after the session's first training step (a step,
    an evaluation or a save, whatever is happening then);
  * one kill per trial is a 'save' kill: it fires as soon as one of the session's asynchronous saves is in flight
    (orbax's temporary step directory appears), i.e. while the checkpoint is half written.
After the kills the trial resumes once more and runs to the end. Checked against the reference, bit for bit: every
logged training loss of every session (a step re-run after a kill must repeat its loss), the validation curve,
the final parameters / optimizer state / RNG / step, and the data position. Each kill is classified by what the
session was doing when it died: 'startup' (no step finished yet), 'save' (a temporary step directory existed) or
'step'. Table printed; JSON written to benchmarks/results/drills.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results", "drills.json")
WORDS = ("the cat sat on a mat and a dog ran far away from the big red house with a green door in the small "
         "town by the river").split()


# ------------------------------------------------------------------------------------------------ the tiny run


def tiny_configs(corpus: str, steps: int, checkpoint_every: int):
  """The tiny Engram+MoE model (as configs/models/engram_moe_tiny.gin, narrowed) and its run."""
  from engram_jax import optim
  from engram_jax.layers.engram_config import EngramConfig
  from engram_jax.layers.moe_config import MoEConfig
  from engram_jax.models.config import ModelConfig
  from engram_jax.run_config import RunConfig

  model = ModelConfig(vocab_size=320, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      dense_hidden=64, num_dense_layers=1, tie_embeddings=True,
                      moe=MoEConfig(num_experts=8, num_shared_experts=1, top_k=2, expert_hidden=32,
                                    dispatch="dropless", bias_update_rate=0.01),
                      engram_layers=(1,), engram=EngramConfig(max_ngram=3, heads_per_order=4, head_dim=8,
                                                              table_base_sizes=(101, 101)))
  run = RunConfig(steps=steps, batch_size=8, seq_len=32, eval_every=max(steps // 4, 1), eval_batches=2,
                  checkpoint_every=checkpoint_every, keep_checkpoints=2, log_every=1, mesh="data=1",
                  data_dir=corpus, optimizer=optim.OptimizerConfig(learning_rate=3e-3, warmup_steps=5))
  return model, run


def build_corpus(data_dir: str) -> None:
  """~400 short documents of a 26-word language and a 300-piece SentencePiece vocabulary."""
  import numpy as np

  from engram_jax.data import prepare
  rng = np.random.default_rng(0)
  docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 80)))) + "." for _ in range(400)]
  prepare.build_corpus(data_dir, {"toy": docs}, {"toy": {"license": "drill"}}, vocab_size=300, num_train_shards=2,
                       validation_fraction=0.05, log=lambda _: None)


def worker(model_dir: str, corpus: str, steps: int, checkpoint_every: int) -> None:
  """One training session (resumes from model_dir's latest checkpoint)."""
  from engram_jax import train
  model, run = tiny_configs(corpus, steps, checkpoint_every)
  train.train_and_evaluate(model, run, model_dir)


# ------------------------------------------------------------------------------------------------ sessions


def child_env(cache_dir: str | None = None) -> dict:
  """One CPU device; with `cache_dir`, JAX's persistent compilation cache (every session after the first loads
  the compiled steps instead of compiling them again: the same executables, so bit-identity is unaffected)."""
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
  return env


def start_session(model_dir: str, args, log_path: str) -> subprocess.Popen:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", model_dir, args.corpus, "--steps", str(args.steps),
         "--checkpoint-every", str(args.checkpoint_every)]
  log = open(log_path, "ab")
  return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(args.cache_dir),
                          cwd=ROOT)


def saving_now(model_dir: str, since: float) -> bool:
  """An asynchronous save of this session is in flight: an orbax temporary step directory created after `since`
  (one left by a killed session is stale until orbax removes it on the next save)."""
  ckpt = os.path.join(model_dir, "checkpoints")
  try:
    names = [n for n in os.listdir(ckpt) if "tmp" in n]
  except FileNotFoundError:
    return False
  for name in names:
    try:
      if os.stat(os.path.join(ckpt, name)).st_mtime >= since:
        return True
    except FileNotFoundError:  # committed (renamed) meanwhile
      pass
  return False


def stepped(log_path: str, offset: int) -> bool:
  """This session (log text after `offset`) has logged a training step."""
  with open(log_path, "rb") as f:
    f.seek(offset)
    return b"| loss " in f.read()


def killed_session(model_dir: str, args, log_path: str, *, at: float | None, on_save: bool, limit: float) -> dict:
  """Starts a session and SIGKILLs it `at` seconds after its first training step, or (on_save) as soon as one of
  its asynchronous saves is in flight; returns what happened. A session that finishes first is not killed."""
  offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
  t0, wall0 = time.time(), time.time() - 1.0  # 1 s slack for file-system timestamp granularity
  proc = start_session(model_dir, args, log_path)
  t_first = None
  while proc.poll() is None:
    now = time.time() - t0
    if t_first is None and stepped(log_path, offset):
      t_first = now
    saving = t_first is not None and saving_now(model_dir, wall0)
    fire = ((on_save and saving) or (at is not None and t_first is not None and now - t_first >= at)
            or now > limit)
    if fire:
      phase = "save" if saving or saving_now(model_dir, wall0) else "step" if stepped(log_path, offset) else "startup"
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return {"killed": True, "at_s": round(now, 3), "after_first_step_s": None if t_first is None else
              round(now - t_first, 3), "phase": phase, "trigger": "save" if on_save else "time"}
    time.sleep(0.002 if t_first is not None else 0.05)
  return {"killed": False, "returncode": proc.returncode, "at_s": round(time.time() - t0, 3),
          "trigger": "save" if on_save else "time"}


def finish_session(model_dir: str, args, log_path: str) -> tuple[int, float, float | None]:
  """Runs a session to its end: (exit code, seconds, seconds from its first training step to the end)."""
  offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
  t0 = time.time()
  proc = start_session(model_dir, args, log_path)
  t_first = None
  while proc.poll() is None:
    if t_first is None and stepped(log_path, offset):
      t_first = time.time()
    time.sleep(0.05)
  end = time.time()
  return proc.returncode, end - t0, None if t_first is None else end - t_first


# ------------------------------------------------------------------------------------------------ comparison


def logged_losses(model_dir: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
  """Every (step, loss) and (step, val_loss) record of metrics.jsonl, in file order (duplicates kept)."""
  train, val = [], []
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except ValueError:  # a line torn by the kill
        continue
      if rec.get("loss") is not None:
        train.append((rec["step"], rec["loss"]))
      if rec.get("val_loss") is not None:
        val.append((rec["step"], rec["val_loss"]))
  return train, val


def final_state(model_dir: str, args):
  """(state leaves as numpy, data position) of the last step's checkpoint."""
  import jax
  import numpy as np

  from engram_jax import checkpoint as ckpt_lib
  from engram_jax import run_dir, sharding, steps
  model, run = tiny_configs(args.corpus, args.steps, args.checkpoint_every)
  with run_dir.x64_context(model):
    setup = steps.make_setup(model, run.optimizer, run.steps, sharding.make_mesh("data=1"),
                             run_dir.read_record(model_dir).compression)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(model_dir, "checkpoints"))
    try:
      state, data = checkpointer.restore(args.steps, setup.abstract)
    finally:
      checkpointer.close()
    return [np.asarray(x) for x in jax.tree.leaves(state)], data


def compare(model_dir: str, reference: dict, args) -> list[str]:
  """What differs from the uninterrupted run (empty: bit-identical)."""
  import numpy as np
  problems = []
  ref_train = dict(reference["train"])
  train, val = logged_losses(model_dir)
  for step, loss in train:
    if ref_train.get(step) != loss:
      problems.append(f"loss at step {step}: {loss!r} != {ref_train.get(step)!r}")
  if sorted({s for s, _ in train}) != sorted(ref_train):
    problems.append(f"logged steps differ: {len({s for s, _ in train})} vs {len(ref_train)}")
  if dict(val) != dict(reference["val"]):
    problems.append(f"validation curve differs: {sorted(dict(val).items())} vs {sorted(reference['val'])}")
  leaves, data = final_state(model_dir, args)
  if data != reference["data"]:
    problems.append(f"data position {data} != {reference['data']}")
  bad = sum(1 for a, b in zip(leaves, reference["leaves"]) if a.shape != b.shape or not np.array_equal(a, b))
  if len(leaves) != len(reference["leaves"]) or bad:
    problems.append(f"{bad} of {len(leaves)} state arrays differ")
  return problems


# ------------------------------------------------------------------------------------------------ main


def report(trials: list[dict], args, horizons: list[float], window: float, straight_problems: list[str],
           t_all: float, *, final: bool) -> dict:
  """Summary table (final) and the JSON (rewritten after every trial, so a stopped run keeps what it did)."""
  all_kills = [k for t in trials for k in t["kills"] if k["killed"]]
  by_phase = {ph: sum(k["phase"] == ph for k in all_kills) for ph in ("startup", "step", "save")}
  summary = {"trials": len(trials), "kills": len(all_kills), "resumes": sum(t["resumes"] for t in trials),
             "mismatching_trials": sum(bool(t["mismatches"]) for t in trials), "kills_by_phase": by_phase,
             "checkpoints_moved_aside": sum(t["moved_aside"] for t in trials), "complete": final}
  if final:
    print("\n| trials | kills | during start-up | during steps | during async saves | resumes | mismatching trials |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {summary['trials']} | {summary['kills']} | {by_phase['startup']} | {by_phase['step']} | "
          f"{by_phase['save']} | {summary['resumes']} | {summary['mismatching_trials']} |")
  result = {"summary": summary, "straight_run_s": round(horizons[1], 2), "cold_straight_run_s": round(horizons[0], 2),
            "horizon_s": round(window / args.horizon_fraction, 2),
            "straight_runs_differ": straight_problems, "kill_window_s": round(window, 2),
            "wall_time_s": round(time.time() - t_all, 1),
            "config": {"steps": args.steps, "checkpoint_every": args.checkpoint_every, "kills_per_trial": args.kills,
                       "horizon_fraction": args.horizon_fraction, "seed": args.seed, "model": "tiny Engram+MoE "
                       "(d_model 32, 2 layers, 8 experts top-2, Engram n<=3 on layer 1), batch 8 x 32, 1 CPU device"},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "trials": trials}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  return result


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--trials", type=int, default=10)
  p.add_argument("--kills", type=int, default=2, help="kills per trial (one of them waits for a save in flight)")
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--checkpoint-every", type=int, default=4)
  p.add_argument("--horizon-fraction", type=float, default=0.6, help="kill times are drawn from [0, this * H]")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--corpus", default=None, help="toy corpus directory (default: built in a temporary directory)")
  p.add_argument("--out", default=RESULTS)
  p.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
  p.add_argument("--worker", nargs=2, metavar=("MODEL_DIR", "CORPUS"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    return worker(args.worker[0], args.worker[1], args.steps, args.checkpoint_every)
  for name in ("trials", "kills", "steps", "checkpoint_every"):
    if getattr(args, name) < 1:
      raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
  if not 0 < args.horizon_fraction <= 1:
    raise SystemExit(f"--horizon-fraction={args.horizon_fraction} must be in (0, 1]")

  os.environ.update(child_env())  # this process restores checkpoints too: same single CPU device as the workers
  work = tempfile.mkdtemp(prefix="engram_drills_")
  if args.corpus is None:
    args.corpus = os.path.join(work, "corpus")
    build_corpus(args.corpus)
  args.cache_dir = os.path.join(work, "jax_cache")
  rng = random.Random(args.seed)
  t_all = time.time()

  # --- the uninterrupted reference, twice: the first fills the compilation cache, the second (start-up as every
  # later session sees it) gives the horizon and must equal the first
  horizons = []
  for name in ("straight_cold", "straight"):
    code, seconds, training = finish_session(os.path.join(work, name), args, os.path.join(work, name + ".log"))
    if code != 0:
      raise SystemExit(f"the uninterrupted run failed (exit {code}); see {os.path.join(work, name + '.log')}")
    horizons.append(seconds)
  horizon = training  # from the first training step to the end: steps, evaluations, saves
  ref_dir = os.path.join(work, "straight")
  ref_train, ref_val = logged_losses(ref_dir)
  leaves, data = final_state(ref_dir, args)
  reference = {"train": ref_train, "val": ref_val, "leaves": leaves, "data": data}
  straight_problems = compare(os.path.join(work, "straight_cold"), reference, args)
  window = args.horizon_fraction * horizon
  print(f"uninterrupted run: {args.steps} steps in {horizons[1]:.1f} s ({horizon:.1f} s from the first step; "
        f"{horizons[0]:.1f} s with a cold compilation cache; the two runs "
        f"{'agree' if not straight_problems else 'DIFFER'}); kill times drawn from [0, {window:.1f}] s after each "
        "session's first step", flush=True)

  # --- trials
  trials = []
  for trial in range(args.trials):
    model_dir, log_path = os.path.join(work, f"trial{trial}"), os.path.join(work, f"trial{trial}.log")
    save_kill = rng.randrange(args.kills)
    kills = []
    for k in range(args.kills):
      at = None if k == save_kill else rng.uniform(0.0, window)
      kills.append(killed_session(model_dir, args, log_path, at=at, on_save=k == save_kill,
                                  limit=2 * horizons[1]))
    code, seconds, _ = finish_session(model_dir, args, log_path)
    problems = [f"final session exited {code}"] if code else compare(model_dir, reference, args)
    with open(log_path, errors="replace") as f:
      log_text = f.read()
    row = {"trial": trial, "kills": kills, "killed": sum(k["killed"] for k in kills),
           "resumes": log_text.count("resumed from step"), "moved_aside": log_text.count("moved to"),
           "final_session_s": round(seconds, 1), "mismatches": problems}
    trials.append(row)
    phases = ",".join(f"{k.get('phase', 'done')}@{k['at_s']:.1f}s" for k in kills)
    print(f"trial {trial}: kills {phases} | resumes {row['resumes']} | "
          f"{'bit-identical' if not problems else 'MISMATCH: ' + '; '.join(problems[:3])}", flush=True)
    report(trials, args, horizons, window, straight_problems, t_all, final=False)

  result = report(trials, args, horizons, window, straight_problems, t_all, final=True)

  print(f"wrote {args.out}")
  if args.keep:
    print(f"run directories kept in {work}")
  else:
    shutil.rmtree(work, ignore_errors=True)
  return result


if __name__ == "__main__":
  main()
