"""SuiteConfig (what to run) and `run_suite` (run it on a loaded checkpoint, write the results).

Results go to `<output_dir>/<suite name>.json` (everything), `<name>.md` (tables) and PNGs beside them; the
default output_dir is `MODEL_DIR/evals/step_<N>/`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from evals import analysis, benchmarks, metrics, plots, report, scoring
from evals.loading import Loaded

OFF_ALL = "all"


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
  """An eval suite: which tasks, how many documents, and which analyses."""

  name: str = "standard"  # Result files are <name>.json / <name>.md in the output directory.
  tasks: tuple[str, ...] = ()  # benchmarks.TASKS names, 'olmes:<task>/<variant>', 'facts_*', 'ruler_*'.
  limit: int | None = None  # Documents per task (the same seeded subset every time); None = all of them.
  batch_size: int = 16  # Rows of seq_len tokens per scoring batch (memory: B x S x V float32 logits).
  seq_len: int | None = None  # Scoring window; None = the model's training sequence length.
  # Also score every task with Engram's output zeroed: 'all' (every Engram layer), a tuple of layer ids, or None.
  engram_off: str | tuple[int, ...] | None = None
  logit_lens: bool = False  # KL and top-1 agreement of early exits per layer, on validation text.
  cka: bool = False  # Linear CKA between this model's layers and compare[0]'s (same validation tokens).
  compare: tuple[str, ...] = ()  # Other checkpoints drawn beside this one in LogitLens (and the CKA partner).
  gate_text: str | None = None  # A text whose per-token Engram gates are drawn (PNG heatmap and HTML).
  gate_ngrams: int = 0  # > 0: table of the most / least gated n-grams of this order on validation text.
  analysis_rows: int = 8  # Validation rows (of seq_len tokens) for LogitLens, CKA and the gate n-gram table.
  facts_seed: int = 0  # Synthetic-facts world the facts_* probes ask about (must match the training mixture's).
  ruler_lengths: tuple[int, ...] = ()  # Context lengths (tokens) of ruler_* tasks; () = seq_len/4, /2 and seq_len.

  def __post_init__(self):
    if self.limit is not None and self.limit < 1:
      raise ValueError(f"SuiteConfig.limit={self.limit} must be >= 1 or None (every document)")
    if self.batch_size < 1 or self.analysis_rows < 1:
      raise ValueError("SuiteConfig.batch_size and analysis_rows must be >= 1")
    if isinstance(self.engram_off, str) and self.engram_off != OFF_ALL:
      raise ValueError(f"SuiteConfig.engram_off={self.engram_off!r}: use 'all', a tuple of layer ids, or None")
    if self.cka and not self.compare:
      raise ValueError("SuiteConfig.cka=True needs a second checkpoint: set SuiteConfig.compare=('DIR',)")
    for name in self.tasks:
      if not (name.startswith(("facts_", "ruler_")) or name in benchmarks.TASKS or name.startswith("olmes:")):
        benchmarks.task_spec(name)  # raises with the list of known names


class Tokenizer:
  """A SentencePiece model: batched encode, decode, and display pieces."""

  def __init__(self, path: str):
    import sentencepiece as spm
    self.path = path
    self.sp = spm.SentencePieceProcessor(model_file=str(path))
    self.eos_id = self.sp.eos_id()

  def encode(self, texts: list[str]) -> list[list[int]]:
    return self.sp.encode(list(texts)) if texts else []

  def decode(self, ids: list[int]) -> str:
    return self.sp.decode([int(i) for i in ids])

  def pieces(self, ids) -> list[str]:
    return [self.sp.id_to_piece(int(i)).replace("\u2581", " ") for i in ids]


def engram_off_layers(setting, engram_layers: tuple[int, ...]) -> tuple[int, ...]:
  if setting is None:
    return ()
  if not engram_layers:
    raise ValueError("SuiteConfig.engram_off is set but the model has no Engram layers "
                     "(ModelConfig.engram_layers is empty); unset it for this checkpoint")
  return tuple(engram_layers) if setting == OFF_ALL else tuple(int(i) for i in setting)


def build_tasks(name: str, suite: SuiteConfig, seq_len: int, tok: Tokenizer) -> list[benchmarks.TaskData]:
  """The TaskData of a task name (RULER tasks give one per context length)."""
  if name.startswith("facts_"):
    from evals import facts
    return [facts.probe_task(name, suite.limit, facts.FactsConfig(seed=suite.facts_seed))]
  if name.startswith("ruler_"):
    from evals import ruler
    if suite.ruler_lengths:  # explicit lengths: one that cannot hold the needles is an error
      return [ruler.build_task(name, n, suite.limit, tok.encode) for n in suite.ruler_lengths]
    return ruler.build_default_lengths(name, seq_len, suite.limit, tok.encode)
  return [benchmarks.load_task(name, suite.limit)]


def score_task(data: benchmarks.TaskData, enc: scoring.Encoded, scorer, seq_len: int, batch_size: int,
               label: str) -> tuple[dict, dict, dict]:
  """(metrics, per-document values of the primary metric and bpb {metric: [N]}, scoring stats) of one task under
  one scorer."""
  s = scoring.score_requests(scorer, enc, seq_len, batch_size, label=label)
  m = metrics.task_metrics(data.doc, data.choice, data.uncond, data.continuations, data.gold, s.loglik, s.tokens,
                           s.greedy, greedy_metric=data.spec.greedy, per_doc=True)
  per_doc = m.pop("per_doc")
  return m, {k: per_doc[k] for k in dict.fromkeys((data.spec.primary, "bpb"))}, s.stats


def validation_rows(loaded: Loaded, tok: Tokenizer, seq_len: int, rows: int) -> dict[str, np.ndarray]:
  """The first `rows` packed rows [rows, S] of the training corpus's validation split (documents + EOS)."""
  from engram_jax.data import packing, prepare
  data_dir = Path(loaded.data_dir) if loaded.data_dir else prepare.default_data_dir()
  manifest = prepare.verify_manifest(data_dir, check_hashes=False)
  if manifest is None:
    raise ValueError(f"no valid corpus manifest in {data_dir}: the analyses read its validation split")
  docs = []
  for path in prepare.split_files(data_dir, manifest, "validation"):
    docs.extend(prepare.read_lines(path))
  ids = [np.asarray(x, np.int32) for x in tok.encode(docs[:max(64, rows * 8)])]
  packed = packing.pack_documents(ids, seq_len, eos_id=tok.eos_id)
  return {k: v[:rows] for k, v in packed.items()}


def _tokenizer_id(loaded: Loaded) -> str:
  """The tokenizer's pieces and scores (two copies of one vocabulary may differ in bytes: older corpus builds
  recorded their build directory in the model file)."""
  from engram_jax.vocab import sentencepiece_fingerprint
  return sentencepiece_fingerprint(Path(loaded.tokenizer_path).read_bytes())


def _analyses(loaded: Loaded, suite: SuiteConfig, tok: Tokenizer, seq_len: int, out: Path, log) -> dict:
  from evals import loading
  result: dict[str, Any] = {}
  if not (suite.logit_lens or suite.cka or suite.gate_ngrams or suite.gate_text):
    return result
  rows = validation_rows(loaded, tok, seq_len, suite.analysis_rows)
  label = lambda ld: f"{ld.model_dir.name} step {ld.step}"  # noqa: E731
  streams = {label(loaded): analysis.run_streams(analysis.make_stream_fn(loaded.model), rows, suite.batch_size)}
  if suite.logit_lens or suite.cka:
    for path in suite.compare:
      other = loading.load(path)
      if _tokenizer_id(other) != _tokenizer_id(loaded):
        raise ValueError(f"SuiteConfig.compare: {path} uses another tokenizer; LogitLens / CKA compare models on the "
                         "same tokens")
      name = label(other) if label(other) not in streams else f"{label(other)} ({len(streams) + 1})"
      streams[name] = analysis.run_streams(analysis.make_stream_fn(other.model), rows, suite.batch_size)
  names = list(streams)
  if suite.logit_lens:
    result["logit_lens"] = {n: {"kl": s["kl"], "agreement": s["agreement"], "tokens": s["tokens"]}
                            for n, s in streams.items()}
    plots.logit_lens_png(out / "logit_lens.png", result["logit_lens"])
    log(f"LogitLens -> {out / 'logit_lens.png'}")
  if suite.cka:
    cka = analysis.cka_matrix(streams[names[0]]["hidden"], streams[names[1]]["hidden"])
    result["cka"] = {"x": names[0], "y": names[1], "matrix": cka, "best_match_in_y": analysis.best_matches(cka),
                     "best_match_in_x": analysis.best_matches(cka.T), "tokens": streams[names[0]]["tokens"]}
    plots.cka_png(out / "cka.png", cka, names[0], names[1])
    log(f"CKA -> {out / 'cka.png'}")
  first = streams[names[0]]
  if suite.gate_ngrams and first["gates"]:
    result["gate_ngrams"] = {}
    for layer, g in first["gates"].items():
      result["gate_ngrams"][int(layer)] = analysis.gated_ngrams(first["inputs"], first["starts"], g.mean(axis=1),
                                                                suite.gate_ngrams, tok.decode)
  if suite.gate_text and loaded.model_config.engram_layers:
    ids = tok.encode([suite.gate_text])[0][:seq_len - 1]
    gates = analysis.gate_map(loaded.model, ids)
    pieces = tok.pieces(ids)
    title = f"Engram gates: {label(loaded)}"
    plots.gates_png(out / "gates.png", pieces, gates, title)
    plots.gates_html(out / "gates.html", pieces, gates, title)
    result["gate_text"] = {"text": suite.gate_text, "pieces": pieces, "gates": {int(k): v for k, v in gates.items()}}
    log(f"gates -> {out / 'gates.png'}, {out / 'gates.html'}")
  return result


def run_suite(loaded: Loaded, suite: SuiteConfig, output_dir: str | Path | None = None, log=print) -> dict:
  """Runs `suite` on a loaded checkpoint; writes <name>.json / .md and PNGs; returns the results dict."""
  t0 = time.time()
  seq_len = suite.seq_len or loaded.seq_len
  off = engram_off_layers(suite.engram_off, tuple(loaded.model_config.engram_layers))
  out = Path(output_dir) if output_dir else loaded.model_dir / "evals" / f"step_{loaded.step}"
  out.mkdir(parents=True, exist_ok=True)
  tok = Tokenizer(loaded.tokenizer_path)
  scorer = scoring.make_token_scorer(loaded.model)
  scorer_off = scoring.make_token_scorer(loaded.model, off) if off else None
  tasks: dict[str, dict] = {}
  for name in suite.tasks:
    for data in build_tasks(name, suite, seq_len, tok):
      t_task = time.time()
      ctx, cont = scoring.encode_pair(tok.encode, data.contexts, data.continuations)
      enc = scoring.truncate(ctx, cont, seq_len)
      m, docs_on, stats = score_task(data, enc, scorer, seq_len, suite.batch_size, data.spec.name)
      entry = {"family": data.spec.family, "primary": data.spec.primary, "chance": m.pop("chance"), "metrics": m,
               "truncated": {"context": int(enc.context_truncated.sum()),
                             "continuation": int(enc.continuation_truncated.sum()), "requests": len(enc.tokens)},
               "scoring": stats, "meta": data.meta, "per_doc": docs_on}
      if scorer_off is not None:
        m_off, docs_off, _ = score_task(data, enc, scorer_off, seq_len, suite.batch_size,
                                        data.spec.name + " (Engram off)")
        m_off.pop("chance")
        p = data.spec.primary
        entry["engram_off"] = m_off
        entry["engram_off_layers"] = list(off)
        entry["per_doc_off"] = docs_off
        if p == "bpb":  # lower is better: the retained share of a bpb is not meaningful, its change is
          entry["retained"] = {"raw": None, "above_chance": None}
        else:
          entry["retained"] = metrics.retained(m[p]["value"], m_off[p]["value"], entry["chance"])
        entry["retained"]["bpb_delta"] = m_off["bpb"]["value"] - m["bpb"]["value"]
        # off - on over the same documents: its standard error is that of the paired difference
        entry["retained"]["paired"] = {k: metrics.paired_difference(docs_on[k], docs_off[k]) for k in docs_on}
      tasks[data.spec.name] = entry
      p = data.spec.primary
      bpb = "" if p == "bpb" else f" | bpb {m['bpb']['value']:.3f}"
      log(f"{data.spec.name}: {p} {m[p]['value']:.4f} ± {m[p]['stderr']:.4f}{bpb} | "
          f"{m['docs']} docs, {len(enc.tokens)} requests, {stats['tokens_per_s']:,.0f} tokens/s | "
          f"{time.time() - t_task:.1f} s")
  results = {"checkpoint": str(loaded.model_dir), "step": loaded.step, "suite": dataclasses.asdict(suite),
             "seq_len": seq_len, "tokenizer": loaded.tokenizer_path, "tasks": tasks}
  if off:
    results["engram_off_summary"] = report.family_summary(tasks)
  results.update(_analyses(loaded, suite, tok, seq_len, out, log))
  results["wall_time_s"] = time.time() - t0
  write_results(results, out, suite.name)
  log(f"results -> {out / (suite.name + '.json')}, {out / (suite.name + '.md')} ({results['wall_time_s']:.0f} s)")
  return results


def write_results(results: dict, out: Path, name: str) -> None:
  """JSON, markdown and the scores PNG of a suite run; prints the markdown tables."""
  tasks = results["tasks"]
  title = f"{results['checkpoint']} step {results['step']}: suite {name}"
  md = [f"# {title}", "", f"Window {results['seq_len']} tokens; scores in % ± standard error; bpb = bits per byte "
        "of the gold continuation; truncated = requests whose context was left-truncated.", ""]
  if tasks:
    md += [report.score_table(tasks), ""]
    if any(t["primary"] != "bpb" for t in tasks.values()):
      plots.scores_png(out / f"{name}_scores.png", tasks, title)
  if "engram_off_summary" in results:
    md += ["## Engram off", "", report.engram_off_table(tasks, results["engram_off_summary"]), ""]
  if "logit_lens" in results:
    md += ["## LogitLens", "", "![](logit_lens.png)", ""]
    for n, r in results["logit_lens"].items():
      md.append(f"- {n}: KL per layer {[round(float(x), 3) for x in r['kl']]}, top-1 agreement "
                f"{[round(float(x), 3) for x in r['agreement']]}")
    md.append("")
  if "cka" in results:
    c = results["cka"]
    md += ["## CKA", "", "![](cka.png)", "", f"Best match in {c['y']} for each layer of {c['x']}: "
           f"{c['best_match_in_y']}", ""]
  for layer, t in results.get("gate_ngrams", {}).items():
    rows = [[repr(a[0]), f"{a[1]:.3f}", str(a[2]), repr(b[0]), f"{b[1]:.3f}", str(b[2])]
            for a, b in zip(t["most"], t["least"])]
    md += [f"## Gate n-grams, Engram layer {layer} (order {t['order']}, {t['ngrams']} n-grams seen often enough)",
           "", report.markdown_table(["most gated", "gate", "count", "least gated", "gate", "count"], rows), ""]
  if "gate_text" in results:
    md += ["## Gate picture", "", "![](gates.png)", "", "[gates.html](gates.html)", ""]
  text = "\n".join(md)
  report.write_json(out / f"{name}.json", results)
  report.atomic_write(out / f"{name}.md", text)
  print(text, flush=True)
