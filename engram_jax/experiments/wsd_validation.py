"""Does a WSD cooldown branch stand in for a full run? One validation point: a cooldown branch ending at T steps
against a cosine run to T (same model, data, seed, peak learning rate).

Per seed: a long WSD run (`source_steps`, cooldown at its end) trained only to k = T - C (stop_after; the schedule
is still at its peak there); a branch from its step-k checkpoint with its own C-step cooldown to T
(RunConfig.init_from); and a cosine run to T from scratch. The branch costs C steps once the source exists.

    python -m engram_jax.experiments.wsd_validation --out evals/results/wsd_validation_toy \
        --gin_file=configs/models/engram_moe_tiny.gin --gin_file=configs/runs/pretrain.gin \
        --steps 160 --cooldown 32 --seeds 0 1 --gin.BATCH_SIZE=8 --gin.SEQ_LEN=128

Writes `<out>/results.json` (final losses, gaps, wall time, versions, command) and `<out>/val_curves.png`; every
run directory is resumable (rerun the command).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from engram_jax.experiments.sparsity_allocation import _jsonable, _write_json, software_versions
from engram_jax.experiments.sweep_report import _figure, _save


def runs_for(model, run, steps: int, cooldown: int, source_steps: int, out: str, seed: int) -> dict:
  """(name -> (model, run config, model dir)) of one seed, in training order."""
  opt = run.optimizer
  wsd = dataclasses.replace(opt, schedule="wsd", decay_steps=cooldown, min_lr_ratio=0.0)
  k = steps - cooldown
  base = dict(seed=seed, checkpoint_every=k, keep_checkpoints=2)
  src_dir = os.path.join(out, f"wsd_source_seed{seed}")
  return {
      "wsd_source": (model, dataclasses.replace(run, steps=source_steps, stop_after=k, optimizer=wsd, **base), src_dir),
      "wsd_branch": (model, dataclasses.replace(run, steps=steps, optimizer=wsd, init_from=src_dir, init_step=k,
                                                **base), os.path.join(out, f"wsd_branch_seed{seed}")),
      "cosine": (model, dataclasses.replace(run, steps=steps, optimizer=dataclasses.replace(
          opt, schedule="cosine", min_lr_ratio=0.0), **base), os.path.join(out, f"cosine_seed{seed}")),
  }


def main(argv=None) -> dict:
  from engram_jax import configurables, train  # noqa: PLC0415
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--gin_file", action="append", required=True)
  p.add_argument("--steps", type=int, required=True, help="T: steps of the branch and of the cosine run")
  p.add_argument("--cooldown", type=int, required=True, help="C: the branch's cooldown steps")
  p.add_argument("--source_steps", type=int, default=None, help="the source's schedule length (default 2 T)")
  p.add_argument("--seeds", type=int, nargs="+", default=[0])
  args, rest = p.parse_known_args(argv)
  bindings = [b[len("--gin."):] for b in rest if b.startswith("--gin.")]
  if len(bindings) != len(rest):
    p.error(f"unrecognized arguments {[b for b in rest if not b.startswith('--gin.')]}")
  out = args.out
  model, run, _ = configurables.resolve("train", args.gin_file, [f"MODEL_DIR='{out}'", f"TRAIN_STEPS={args.steps}",
                                                                 *bindings])
  os.makedirs(out, exist_ok=True)
  results, t0 = {"runs": {}}, time.time()
  for seed in args.seeds:
    for name, (m, r, d) in runs_for(model, run, args.steps, args.cooldown, args.source_steps or 2 * args.steps, out,
                                    seed).items():
      t = time.time()
      res = train.train_and_evaluate(m, r, d)
      results["runs"][f"{name}_seed{seed}"] = {"seed": seed, "kind": name, "wall_s_this_invocation": time.time() - t,
                                                "steps": res["steps"], "start_step": res["start_step"],
                                                "final_val_loss": res["final_val_loss"], "val_curve": res["val_curve"],
                                                "tokens": res["tokens"], "run_config": _jsonable(r)}
  gaps = {s: results["runs"][f"wsd_branch_seed{s}"]["final_val_loss"] - results["runs"][f"cosine_seed{s}"][
      "final_val_loss"] for s in args.seeds}
  results.update(command=" ".join([sys.executable, "-m", "engram_jax.experiments.wsd_validation", *(
      argv if argv is not None else sys.argv[1:])]), versions=software_versions(), model_config=_jsonable(model),
                 gap_branch_minus_cosine=gaps, wall_s_this_invocation=time.time() - t0)
  _write_json(os.path.join(out, "results.json"), results)
  fig, axes = _figure(1)
  ax = axes[0, 0]
  for i, (name, r) in enumerate(results["runs"].items()):
    curve = [(s, v) for s, v in r["val_curve"] if s > 0]
    ax.plot([s for s, _ in curve], [v for _, v in curve], marker=".", color=f"C{i}", label=name)
  ax.set_xlabel("training step")
  ax.set_ylabel("validation loss")
  ax.set_title(f"WSD branch (cooldown {args.cooldown}) vs cosine to {args.steps} steps")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _save(fig, os.path.join(out, "val_curves.png"))
  print(json.dumps({"gap_branch_minus_cosine": gaps, **{k: v["final_val_loss"] for k, v in results["runs"].items()}},
                   indent=1))
  return results


if __name__ == "__main__":
  main()
