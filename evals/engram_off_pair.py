"""Engram-off on matched models that have stored facts (arXiv 2601.07372, section 6), one resumable command.

Per seed, an Engram+MoE model and its MoE twin (the same config without Engram layers: same backbone, data order,
tokens and schedule) are trained on a corpus mixed with synthetic-facts biographies (evals.mixtures), then scored:
the Engram+MoE model with Engram on and with every Engram layer's output zeroed, the MoE twin as a reference, and
(optionally) LogitLens, CKA and the gate picture of the pair. `facts_closed` asks the training biographies' facts
with no context (knowledge); `facts_open` states an unseen person's fact in the context and asks it (reading).

    python -m evals.engram_off_pair --gin_file=configs/experiments/engram_off_facts.gin

Layout: `<out_dir>/seed<s>/{engram_moe,moe}/` (run directories; rerunning resumes an interrupted training and skips
finished trainings and suites), their suite results in `evals/`, the pair's analysis in `seed<s>/analysis/`.
Written after every invocation: `results.json` (per seed and task: MoE, Engram on, Engram off, the paired off - on
and Engram - MoE differences over the same probes, retained fractions; their means over seeds), `engram_off.png`
and `README.md` (tables; a hand-written reading from '## Reading (by hand' on is kept across reruns).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engram_jax import cli
from engram_jax.models.config import ModelConfig
from evals import compare, plots, report
from evals.suite import OFF_ALL, SuiteConfig

ENGRAM, MOE = "engram_moe", "moe"


@dataclasses.dataclass(frozen=True)
class PairConfig:
  """What the Engram-off pair scores."""

  seeds: tuple[int, ...] = (0, 1)  # One pair per seed (RunConfig.seed: init and data order).
  tasks: tuple[str, ...] = ("facts_closed", "facts_open", "lambada", "boolq", "hellaswag", "arc_easy", "piqa")
  limit: int | None = 300  # Documents per task (the same seeded subset for every model and seed).
  batch_size: int = 16  # Scoring rows per batch.
  facts_seed: int = 0  # The synthetic-facts world; must be the training mixture's (evals.mixtures uses seed 0).
  analysis: bool = True  # LogitLens, CKA and gate pictures of each seed's pair.
  analysis_rows: int = 16
  gate_text: str | None = None  # A sentence whose Engram gates are drawn (analysis).

  def __post_init__(self):
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f"PairConfig.seeds={self.seeds}: give distinct seeds")
    if not self.tasks:
      raise ValueError("PairConfig.tasks is empty: give the probes to score, e.g. ('facts_closed', 'facts_open')")
    SuiteConfig(tasks=self.tasks, limit=self.limit, batch_size=self.batch_size)  # unknown task names fail here


def moe_twin(model: ModelConfig) -> ModelConfig:
  """The same model without Engram layers."""
  return dataclasses.replace(model, engram_layers=(), engram=None)


def check_pair(model: ModelConfig, run) -> None:
  """Config errors, before anything is trained or written."""
  if not model.engram_layers or model.engram is None:
    raise ValueError("engram_off_pair.model_config has no Engram layers (ModelConfig.engram_layers / .engram); "
                     "give the Engram+MoE model (its MoE twin is derived by removing them)")
  if not str(run.task).startswith("engram_corpus_facts_"):
    raise ValueError(f"RunConfig.task={run.task!r}: the pair trains on a facts mixture so that facts_closed has "
                     "something to recall; use MIXTURE_OR_TASK_NAME = 'engram_corpus_facts_<P>'")


# ------------------------------------------------------------------------------------------------ analysis


def _pct(x: float | None) -> float | None:
  return None if x is None else 100.0 * x


def seed_rows(on_off: dict, moe: dict) -> dict[str, dict]:
  """Per task of one seed: the primary metric for the MoE twin, Engram on and Engram off, the paired differences
  (off - on; Engram on - MoE) over the same documents, and the retained fractions."""
  rows = {}
  for name, t in on_off["tasks"].items():
    p, tm = t["primary"], moe["tasks"].get(name)
    rows[name] = {"family": t["family"], "primary": p, "chance": t["chance"], "docs": t["metrics"]["docs"],
                  "on": t["metrics"][p], "off": t["engram_off"][p], "moe": tm["metrics"][p] if tm else None,
                  "off_minus_on": t["retained"]["paired"][p],
                  "engram_minus_moe": compare.difference(tm, t, p) if tm else None,
                  "retained": t["retained"]["raw"], "retained_above_chance": t["retained"]["above_chance"],
                  "bpb": {"on": t["metrics"]["bpb"]["value"], "off": t["engram_off"]["bpb"]["value"],
                          "moe": tm["metrics"]["bpb"]["value"] if tm else None}}
  return rows


def across_seeds(per_seed: dict[int, dict]) -> dict[str, dict]:
  """Per task: the mean over seeds of each score and difference, the per-seed differences, and the spread of the
  off - on difference over seeds (sample std; None with one seed)."""
  out = {}
  tasks = dict.fromkeys(n for rows in per_seed.values() for n in rows)
  for name in tasks:
    rs = [rows[name] for rows in per_seed.values() if name in rows]
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    val = lambda key: [r[key]["value"] for r in rs if r[key] is not None]  # noqa: E731
    diffs = val("off_minus_on")
    out[name] = {"family": rs[0]["family"], "primary": rs[0]["primary"], "chance": rs[0]["chance"], "seeds": len(rs),
                 "on": mean(val("on")), "off": mean(val("off")), "moe": mean(val("moe")),
                 "off_minus_on": mean(diffs), "off_minus_on_per_seed": diffs,
                 "off_minus_on_seed_std": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None,
                 "engram_minus_moe": mean(val("engram_minus_moe")),
                 "engram_minus_moe_per_seed": val("engram_minus_moe"),
                 "retained": mean([r["retained"] for r in rs if r["retained"] is not None]),
                 "retained_above_chance": mean([r["retained_above_chance"] for r in rs
                                                if r["retained_above_chance"] is not None]),
                 "bpb_off_minus_on": mean([r["bpb"]["off"] - r["bpb"]["on"] for r in rs])}
  return out


def readme(results: dict) -> str:
  """README.md: command, versions, wall times, the per-seed and mean tables."""
  lines = ["# Engram-off on a matched Engram+MoE / MoE pair: results", "",
           "Written by evals.engram_off_pair (rerun the command to resume / refresh).", "", "Command:", "",
           "    " + results["command"], "", f"Versions: {', '.join(f'{k} {v}' for k, v in results['versions'].items())}",
           "", f"Training wall time: {results['train_wall_s'] / 60:.1f} min; scoring {results['eval_wall_s'] / 60:.1f} "
           f"min (this invocation's work only; finished parts are skipped).", "",
           "Validation loss at the end of training (the facts mixture):", "", "| seed | MoE | Engram+MoE | diff |",
           "|---|---|---|---|"]
  for seed, v in results["val_loss"].items():
    lines.append(f"| {seed} | {v[MOE]:.4f} | {v[ENGRAM]:.4f} | {v[ENGRAM] - v[MOE]:+.4f} |")
  fmt = lambda m: "" if m is None else f"{_pct(m['value']):.1f} ± {_pct(m['stderr']):.1f}"  # noqa: E731
  for seed, rows in results["per_seed"].items():
    lines += ["", f"## Seed {seed} (scores in %, ± binomial standard error; differences paired over the same probes)",
              "", "| task | family | metric | chance | MoE | Engram on | Engram off | off - on | Engram - MoE | "
              "retained (above chance) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
      if r["primary"] == "bpb":
        cells = [f"{r[k]['value']:.3f}" if r[k] else "" for k in ("moe", "on", "off")]
        cells += [f"{r[k]['value']:+.3f} ± {r[k]['stderr']:.3f}" if r[k] else ""
                  for k in ("off_minus_on", "engram_minus_moe")] + [""]
      else:
        cells = [fmt(r["moe"]), fmt(r["on"]), fmt(r["off"])]
        cells += [f"{_pct(r[k]['value']):+.1f} ± {_pct(r[k]['stderr']):.1f}" if r[k] else ""
                  for k in ("off_minus_on", "engram_minus_moe")]
        keep = [f"{100 * x:.0f}%" if x is not None else "-" for x in (r["retained"], r["retained_above_chance"])]
        cells.append(f"{keep[0]} ({keep[1]})")
      chance = "-" if r["chance"] is None else f"{100 * r['chance']:.1f}"
      lines.append(f"| {name} | {r['family']} | {r['primary']} | {chance} | " + " | ".join(cells) + " |")
  m = results["mean"]
  lines += ["", f"## Mean over {len(results['per_seed'])} seed(s)", "",
            "| task | metric | MoE | Engram on | Engram off | off - on (per seed) | Engram - MoE (per seed) | retained "
            "(above chance) | Δ bpb off - on |", "|---|---|---|---|---|---|---|---|---|"]
  for name, r in m.items():
    s = 1.0 if r["primary"] == "bpb" else 100.0
    f = "{:.3f}" if r["primary"] == "bpb" else "{:.1f}"
    per = lambda xs: ", ".join(("{:+" + f[2:]).format(s * x) for x in xs)  # noqa: E731
    keep = [f"{100 * x:.0f}%" if x is not None else "-" for x in (r["retained"], r["retained_above_chance"])]
    lines.append(f"| {name} | {r['primary']} | {'' if r['moe'] is None else f.format(s * r['moe'])} | "
                 f"{f.format(s * r['on'])} | {f.format(s * r['off'])} | "
                 f"{('{:+' + f[2:]).format(s * r['off_minus_on'])} ({per(r['off_minus_on_per_seed'])}) | "
                 + (f"{('{:+' + f[2:]).format(s * r['engram_minus_moe'])} ({per(r['engram_minus_moe_per_seed'])})"
                    if r["engram_minus_moe"] is not None else "") +
                 f" | {keep[0]} ({keep[1]}) | {r['bpb_off_minus_on']:+.3f} |")
  if results.get("analysis"):
    lines += ["", "## LogitLens and CKA (per seed: Engram+MoE vs MoE)", ""]
    for seed, a in results["analysis"].items():
      lines.append(f"- seed {seed}: KL to the final distribution per layer {a['kl']}; CKA best match in the MoE "
                   f"for each Engram+MoE layer {a['best_match']} (diagonal {a['cka_diagonal']}); files in "
                   f"seed{seed}/analysis/")
  if results.get("not_finished"):
    lines += ["", f"Not finished (left out): {', '.join(results['not_finished'])}."]
  return "\n".join(lines) + "\n"


def pair_png(path: Path, mean: dict, per_seed: dict) -> None:
  """Accuracy tasks: the MoE twin, Engram on and Engram off (bars: mean over seeds; dots: each seed)."""
  names = [n for n, r in mean.items() if r["primary"] != "bpb"]
  plt, (fig, ax) = plots._figure(max(6, 0.9 * len(names) + 2), 4)
  x = np.arange(len(names))
  for i, (key, label) in enumerate((("moe", "MoE twin"), ("on", "Engram on"), ("off", "Engram off"))):
    xs = x + (i - 1) * 0.27
    ax.bar(xs, [100 * (mean[n][key] or np.nan) for n in names], 0.27, label=label, color=f"C{i}", alpha=0.8)
    for rows in per_seed.values():
      ax.plot(xs, [100 * rows[n][key]["value"] if n in rows and rows[n][key] else np.nan for n in names], "k.", ms=4)
  for j, n in enumerate(names):
    if mean[n]["chance"] is not None:
      ax.hlines(100 * mean[n]["chance"], j - 0.45, j + 0.45, colors="k", linestyles="dashed",
                label="chance" if j == 0 else None)
  ax.set_xticks(x, [f"{n}\n({mean[n]['primary']})" for n in names], fontsize=8)
  ax.set_ylabel("score (%)")
  ax.set_title(f"Engram-off on a matched pair ({len(per_seed)} seed(s); dots: seeds)")
  ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  plots._save(plt, fig, path)


# ------------------------------------------------------------------------------------------------ runner


def _complete(model_dir: Path, steps: int) -> dict | None:
  try:
    result = json.loads((model_dir / "result.json").read_text())
  except (OSError, ValueError):
    return None
  return result if result.get("status") == "complete" and result.get("steps") == steps else None


def _suite(model_dir: Path, suite: SuiteConfig, out: Path, log) -> tuple[dict, float]:
  """The suite's results from `out` when they were written with this suite config, else scored now."""
  from evals.loading import load
  from evals.suite import run_suite
  path = out / f"{suite.name}.json"
  if path.exists():
    saved = json.loads(path.read_text())
    if saved.get("suite") == report.jsonable(dataclasses.asdict(suite)):
      log(f"[{model_dir.parent.name}/{model_dir.name}] {suite.name}: scored earlier (skipped)")
      return saved, 0.0
  t0 = time.time()
  run_suite(load(model_dir), suite, out, log=log)
  return json.loads(path.read_text()), time.time() - t0  # as saved (the report reads files, not live arrays)


def run_pair(pair: PairConfig, model: ModelConfig, run, out_dir: str, *, command: str | None = None,
             log=print) -> dict:
  """Trains and scores every seed's pair not finished under `out_dir`; writes results.json, the PNG, README.md."""
  from engram_jax import train
  from engram_jax.experiments.memory_experiments import keep_hand_reading
  from engram_jax.experiments.sparsity_allocation import software_versions
  from engram_jax.experiments.sweep_report import final_loss
  check_pair(model, run)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  per_seed, val_loss, analysis, missing = {}, {}, {}, []
  train_s = eval_s = 0.0
  for seed in pair.seeds:
    dirs = {ENGRAM: out / f"seed{seed}" / ENGRAM, MOE: out / f"seed{seed}" / MOE}
    cfg = dataclasses.replace(run, seed=seed)
    results = {}
    for name, m in ((ENGRAM, model), (MOE, moe_twin(model))):
      done = _complete(dirs[name], cfg.steps)
      if done is None:
        log(f"[seed{seed}/{name}] training {cfg.steps} steps")
        t0 = time.time()
        done = train.train_and_evaluate(m, cfg, dirs[name])
        train_s += time.time() - t0
        if done.get("status") != "complete":
          missing.append(f"seed{seed}/{name}")
          continue
      results[name] = done
    if len(results) < 2:
      continue
    val_loss[str(seed)] = {n: final_loss(r) for n, r in results.items()}
    common = dict(tasks=pair.tasks, limit=pair.limit, batch_size=pair.batch_size, facts_seed=pair.facts_seed)
    on_off, dt = _suite(dirs[ENGRAM], SuiteConfig(name="engram_off", engram_off=OFF_ALL, **common),
                        dirs[ENGRAM] / "evals", log)
    eval_s += dt
    moe, dt = _suite(dirs[MOE], SuiteConfig(name="standard", **common), dirs[MOE] / "evals", log)
    eval_s += dt
    per_seed[str(seed)] = seed_rows(on_off, moe)
    if pair.analysis:
      an, dt = _suite(dirs[ENGRAM], SuiteConfig(name="analysis", logit_lens=True, cka=True, compare=(str(dirs[MOE]),),
                                                gate_text=pair.gate_text, gate_ngrams=2,
                                                analysis_rows=pair.analysis_rows, batch_size=pair.batch_size),
                      out / f"seed{seed}" / "analysis", log)
      eval_s += dt
      cka = np.asarray(an["cka"]["matrix"], np.float64)
      analysis[str(seed)] = {"kl": {k: [round(float(x), 3) for x in v["kl"]] for k, v in an["logit_lens"].items()},
                             "best_match": an["cka"]["best_match_in_y"],
                             "cka_diagonal": [round(float(x), 3) for x in np.diag(cka)]}
  if not per_seed:
    raise ValueError(f"{out_dir}: no seed's pair finished training; see {missing}")
  results = {"pair": pair, "model_config": model, "run": run, "versions": software_versions(),
             "command": command or " ".join([sys.executable] + sys.argv), "val_loss": val_loss,
             "per_seed": per_seed, "mean": across_seeds(per_seed), "analysis": analysis, "not_finished": missing,
             "train_wall_s": train_s, "eval_wall_s": eval_s}
  report.write_json(out / "results.json", report.jsonable(json.loads(json.dumps(results, default=_default))))
  pair_png(out / "engram_off.png", results["mean"], per_seed)
  text = readme(results)
  report.atomic_write(out / "README.md", keep_hand_reading(str(out / "README.md"), text))
  log(text)
  return results


def _default(x):
  return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else str(x)


ENTRY = cli.Entry(
    "python -m evals.engram_off_pair", "engram_off_pair",
    "Engram-off on matched Engram+MoE / MoE models trained on a facts mixture, per seed: train both, score "
    "Engram on / off and the twin, LogitLens / CKA; results.json, PNG, README (resumable).",
    (("OUT_DIR", "directory of the experiment: seed<s>/{engram_moe,moe}/ run directories, results, README"),
     ("TRAIN_STEPS", "optimizer steps of every model"), ("BATCH_SIZE", "global rows per step"),
     ("SEQ_LEN", "tokens per row"), ("MIXTURE_OR_TASK_NAME", "the facts mixture, 'engram_corpus_facts_<P>'")),
    configurables="PairConfig.*, " + cli.CONFIGURABLES,
    examples=("python -m evals.engram_off_pair --gin_file=configs/experiments/engram_off_facts.gin",))


def main(argv: Sequence[str] | None = None) -> dict:
  from engram_jax import configurables
  from evals.configurables import engram_off_pair_args
  argv = sys.argv[1:] if argv is None else list(argv)
  files, bindings, args = cli.parse_flags(argv, ENTRY)
  try:  # every config error (gin, a field, the pair's checks) is reported before anything trains
    configurables.parse(files, bindings, args.gin_search_path, entry=ENTRY)
    pair, model, run, out_dir = engram_off_pair_args()
    check_pair(model, run)
  except (ValueError, TypeError) as e:
    print(f"{ENTRY.prog}: error: {e}", file=sys.stderr, flush=True)
    raise SystemExit(cli.EXIT_CONFIG) from None
  command = " ".join([sys.executable, "-m", "evals.engram_off_pair", *argv])
  return run_pair(pair, model, run, out_dir, command=command)


if __name__ == "__main__":  # run the importable module's main, so gin sees a single copy of the configurables
  from evals import engram_off_pair as _entry
  _entry.main()
