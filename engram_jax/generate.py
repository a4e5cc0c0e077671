"""Generate text from a checkpoint, streamed to the terminal, then tokens/s.

    python -m engram_jax.generate --gin.CHECKPOINT_PATH=DIR --prompt "The king said" [--prompt "..."]
        [--max_new_tokens 64] [--temperature 0.8] [--top_k 40] [--top_p 0.95] [--seed 0] [--stop "."]
        [--gin.DecodeConfig.table_placement="'host'"] [--gin.ROW_COUNTS="'DIR/row_counts.npz'"
         --gin.DecodeConfig.hot_rows=2048]

CHECKPOINT_PATH is a MODEL_DIR (its latest checkpoint), its checkpoints/ directory or checkpoints/<step>; the model,
its tokenizer and its Engram hashing come from the run directory. Settings (configs/runs/generate.gin):
DecodeConfig.* (batch size, prefill chunk, table placement, hot rows), CONTEXT (KV-cache slots; default: the run's
training sequence length), MESH (e.g. 'data=2'), ROW_COUNTS (row frequencies for the hot-row cache, from
`python -m engram_jax.count_rows`). Several --prompt flags are generated as one batch (printed one after another).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence

from engram_jax import cli
from engram_jax.decode import DecodeConfig, Engine, Request, SamplingParams, SentencePieceTokenizer, engine_summary


def load_engine(checkpoint_path: str, config: DecodeConfig, context: int | None = None, mesh_spec: str | None = None,
                row_counts: str | None = None) -> tuple[Engine, SentencePieceTokenizer, object]:
  """(engine, tokenizer, run record) for a checkpoint: the model on `mesh_spec` (None: one device), its own
  tokenizer, a context of `context` tokens (None: the run's training sequence length)."""
  from engram_jax import host_table, sharding
  from engram_jax.run_dir import load_model

  mesh = None if mesh_spec is None else sharding.make_mesh(mesh_spec)
  model, record = load_model(checkpoint_path, mesh=mesh)
  if record.tokenizer_path is None:
    raise ValueError(f"CHECKPOINT_PATH={checkpoint_path!r}: the run directory holds no tokenizer; generation needs "
                     "the SentencePiece model the run was trained with")
  tokenizer = SentencePieceTokenizer(record.tokenizer_path)
  if not (context or record.seq_len):
    raise ValueError(f"CONTEXT: the run in {record.model_dir} records no training sequence length; set "
                     "--gin.CONTEXT=N (KV-cache slots per row)")
  if record.needs_x64:  # 64-bit Engram hashing (EngramConfig.hash_bits=64) runs with jax x64 on
    import jax
    jax.config.update("jax_enable_x64", True)
  config = dataclasses.replace(config, max_len=context or record.seq_len, eos_id=tokenizer.eos_id)
  counts = None if row_counts is None else host_table.load_row_counts(row_counts)
  return Engine(model, config, mesh=mesh, tokenizer=tokenizer, row_counts=counts), tokenizer, record


def resolve(argv: Sequence[str], entry: cli.Entry = cli.GENERATE):
  """The gin flags of the project's one CLI layer -> the `serving` arguments (checkpoint path, decode config,
  context, mesh, row counts, server config); the entry point's own flags are returned as `rest`."""
  from engram_jax import configurables

  argv = list(argv)
  gin_flags = [a for a in argv if a.startswith("--gin") or a in ("--distributed", "-h", "--help")]
  rest = [a for a in argv if a not in gin_flags]
  gin_files, bindings, args = cli.parse_flags(gin_flags, entry)
  if args.distributed:
    cli.initialize_distributed()
  return configurables.resolve("serving", gin_files, bindings, args.gin_search_path, entry=entry), rest


def main(argv: Sequence[str] | None = None) -> list:
  argv = sys.argv[1:] if argv is None else argv
  (checkpoint_path, config, context, mesh, row_counts, _), rest = resolve(argv, cli.GENERATE)
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--prompt", action="append", required=True, help="text to continue (repeatable: one batch)")
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  args = p.parse_args(rest)
  config = dataclasses.replace(config, batch_size=max(config.batch_size, len(args.prompt)))
  engine, tokenizer, record = load_engine(checkpoint_path, config, context, mesh, row_counts)
  sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
  requests = [Request(tokenizer.encode(t), args.max_new_tokens, sampling, tuple(args.stop)) for t in args.prompt]
  for r in requests:
    engine.check(r)
  print(f"{record.model_dir} step {record.step}: context {engine.config.max_len}, tables {engine.placement}; "
        "compiling...", file=sys.stderr, flush=True)
  engine.generate([Request(requests[0].prompt[:1], 1)])  # compile before timing
  engine.stats = {k: 0 if isinstance(v, int) else 0.0 for k, v in engine.stats.items()}
  single = len(requests) == 1
  if single:
    print(args.prompt[0], end="", flush=True)
  t0 = time.perf_counter()
  results = engine.generate(requests, (lambda i, tok, text: print(text, end="", flush=True)) if single else None)
  wall = time.perf_counter() - t0
  if single:
    print()
  else:
    for prompt, res in zip(args.prompt, results):
      print(f"--- {prompt}{res.text}")
  s = engine_summary(engine)
  tokens = sum(len(r.tokens) for r in results)
  print(f"{tokens} tokens in {wall:.2f} s: {tokens / wall:.1f} tokens/s overall, decode "
        f"{s['decode_tokens_per_s']:.1f} tokens/s, prefill {s['prompt_tokens']} tokens in {s['prefill_s']:.2f} s"
        + (f", hot-row hit rate {s['hit_rates']}" if s.get("hit_rates") else ""), file=sys.stderr, flush=True)
  return results


if __name__ == "__main__":  # run the importable module's main, so gin sees a single copy of the configurables
  from engram_jax import generate as _entry
  _entry.main()
