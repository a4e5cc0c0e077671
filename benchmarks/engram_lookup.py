"""Engram table lookup strategies on 8 fake CPU devices, and hashing throughput.

  python benchmarks/engram_lookup.py [--quick] [--meshes data=8 data=2,expert=2,model=2] [--out PATH]

For table rows V in {1e5, 1e6, 4e6} (head_dim 64, ids [8, 512, 16]): forward and forward+backward time of each
strategy ('take' = pinned GSPMD baseline, 'shard_map', 'all_to_all'; 'take_unpinned' for context) as a ratio to
the baseline (medians), and every collective in the compiled forward+backward HLO with its bytes; a collective
whose bytes change with V is flagged. Then hashing throughput (numpy vs jit, tokens/s) and, when the project
corpus is present (python -m engram_jax.data.prepare), per-head collision rates against a random function.
Prints tables and writes JSON (default benchmarks/results/engram_lookup.json).
CPU numbers: only ratios mean anything; fwd+bwd is dominated by materialising the dense [V, d] gradient.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engram_jax import hashing, sharding  # noqa: E402
from engram_jax.layers.engram import lookup_rows  # noqa: E402

HEAD_DIM, BATCH, SEQ, HEADS = 64, 8, 512, 16
STRATEGIES = ("take", "shard_map", "all_to_all", "take_unpinned")
_DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s64": 8, "u64": 8, "f64": 8, "pred": 1, "s8": 1,
                "u8": 1}
_COLL = re.compile(r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\(")
_SHAPE = re.compile(r"\b(f32|s32|u32|bf16|f16|s64|u64|f64|pred|s8|u8)\[([0-9,]*)\]")


def collectives(hlo: str) -> list[dict]:
  """Every collective in compiled HLO text: kind, result shapes and bytes."""
  out = []
  for line in hlo.splitlines():
    m = _COLL.search(line)
    if not m or "=" not in line:
      continue
    rhs = line.split("=", 1)[1]
    shapes = _SHAPE.findall(rhs[:rhs.find(m.group(0))])  # the result type(s) before the op name
    nbytes = sum(_DTYPE_BYTES[dt] * int(np.prod([int(d) for d in dims.split(",") if d] or [1])) for dt, dims in shapes)
    out.append(dict(kind=m.group(1), shapes=[f"{dt}[{dims}]" for dt, dims in shapes], bytes=nbytes))
  return out


def _median_ms(fn, args, reps):
  jax.block_until_ready(fn(*args))  # compile + warm
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(1e3 * (time.perf_counter() - t0))
  return float(np.median(times))


def _lookup_fns(strategy, mesh):
  if strategy == "take_unpinned":
    look = lambda t, r: jnp.take(t, r, axis=0)  # noqa: E731
  else:
    look = lambda t, r: lookup_rows(t, r, strategy, mesh, capacity_factor=2.0)[0]  # noqa: E731
  fwd = jax.jit(look)
  fwdbwd = jax.jit(jax.value_and_grad(lambda t, r, w: jnp.sum(look(t, r) * w)))  # the loss needs the forward too
  return fwd, fwdbwd


def bench_lookup(mesh_spec: str, num_rows: int, reps: int, strategies) -> dict:
  """Times all strategies in interleaved rounds (so load drift on a shared machine hits them alike) and lists
  the collectives of each compiled fwd+bwd, also compiled (not run) at 2V to tell which ones scale with V."""
  mesh = sharding.make_mesh(mesh_spec)
  t_sh = NamedSharding(mesh, sharding.logical_to_spec(("table_rows", "table_dim"), mesh=mesh))
  table = jax.jit(lambda k: jax.random.normal(k, (num_rows, HEAD_DIM)), out_shardings=t_sh)(jax.random.key(0))
  rows = jax.device_put(jax.random.randint(jax.random.key(1), (BATCH, SEQ, HEADS), 0, num_rows),
                        sharding.batch_sharding(mesh, 3))
  w = jax.device_put(jnp.ones((BATCH, SEQ, HEADS, HEAD_DIM)), sharding.batch_sharding(mesh, 4))
  table2x = jax.ShapeDtypeStruct((2 * num_rows, HEAD_DIM), jnp.float32, sharding=t_sh)
  fns, res = {}, {}
  for s in strategies:
    fwd, fwdbwd = _lookup_fns(s, mesh)
    coll = collectives(fwdbwd.lower(table, rows, w).compile().as_text())
    coll2x = collectives(fwdbwd.lower(table2x, rows, w).compile().as_text())
    res[s] = dict(collectives=coll, scales_with_V=sorted(c["bytes"] for c in coll) != sorted(c["bytes"] for c in coll2x))
    if s != "take_unpinned":
      res[s]["dropped_ids"] = int(lookup_rows(table, rows, s, mesh, capacity_factor=2.0)[1])
    jax.block_until_ready((fwd(table, rows), fwdbwd(table, rows, w)))  # compile + warm
    fns[s] = (fwd, fwdbwd)
  main = [s for s in strategies if s != "take_unpinned"]
  times = {s: ([], []) for s in main}
  for _ in range(reps):
    for s in main:
      for k, (fn, args) in enumerate(((fns[s][0], (table, rows)), (fns[s][1], (table, rows, w)))):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times[s][k].append(1e3 * (time.perf_counter() - t0))
  for s in main:
    res[s]["fwd_ms"], res[s]["fwdbwd_ms"] = (float(np.median(t)) for t in times[s])
  if "take_unpinned" in strategies:  # timed apart: its multi-GiB all-reduce would slow whatever runs next
    fwd, fwdbwd = fns["take_unpinned"]
    res["take_unpinned"]["fwd_ms"] = _median_ms(fwd, (table, rows), reps)
    res["take_unpinned"]["fwdbwd_ms"] = _median_ms(fwdbwd, (table, rows, w), max(2, reps // 3))
  del table
  return res


def bench_hashing(reps: int) -> dict:
  spec32 = hashing.make_hash_specs(max_ngram=3, heads_per_order=8, table_base_sizes=(500_000, 500_000), seed=0,
                                   hash_bits=32, layer_ids=[1], vocab_size=100_000, pad_id=0)[1]
  ids = np.random.default_rng(0).integers(0, 100_000, (64, 512)).astype(np.int32)
  seg = np.sort(np.random.default_rng(1).integers(0, 8, (64, 512)), axis=1).astype(np.int32)
  out = {}
  for bits in (32, 64):
    spec = spec32 if bits == 32 else hashing.make_hash_specs(
        max_ngram=3, heads_per_order=8, table_base_sizes=(500_000, 500_000), seed=0, hash_bits=64, layer_ids=[1],
        vocab_size=100_000, pad_id=0)[1]
    t_np = _median_ms(lambda: hashing.hash_ngrams_np(ids, seg, spec), (), reps)
    with jax.enable_x64(bits == 64):
      f = jax.jit(lambda x, s: hashing.hash_ngrams_jnp(x, s, spec))
      xj, sj = jnp.asarray(ids), jnp.asarray(seg)
      t_jit = _median_ms(f, (xj, sj), reps)
    out[f"{bits}bit"] = dict(tokens=ids.size, numpy_tok_s=ids.size / t_np * 1e3, jit_tok_s=ids.size / t_jit * 1e3)
  return out


def bench_collisions(max_chars: int) -> dict | None:
  corpus = Path(os.environ.get("ENGRAM_DATA_DIR") or Path.home() / ".cache" / "engram_jax" / "corpus")
  if not (corpus / "spm.model").exists():
    return None
  import sentencepiece as spm  # noqa: PLC0415
  sp = spm.SentencePieceProcessor(model_file=str(corpus / "spm.model"))
  text = (corpus / "validation-00000-of-00001.txt").read_text()[:max_chars]
  comp = hashing.build_compression([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
  ids = comp[np.asarray(sp.encode(text))]
  out = dict(tokens=int(ids.size), vocab=int(comp.size), compressed_vocab=hashing.compressed_vocab_size(comp),
             reduction_ratio=hashing.reduction_ratio(comp), heads=[])
  for bits in (32, 64):
    spec = hashing.make_hash_specs(max_ngram=3, heads_per_order=4, table_base_sizes=(20_011, 20_011), seed=0,
                                   hash_bits=bits, layer_ids=[1], vocab_size=hashing.compressed_vocab_size(comp),
                                   pad_id=int(comp[0]))[1]
    rows = hashing.hash_ngrams_np(ids[None], None, spec)[0]  # [S, H]
    h = 0
    for n in (2, 3):
      grams = np.stack([np.concatenate([np.full(i, spec.pad_id), ids[:ids.size - i]]) for i in range(n)], axis=1)
      uniq, first = np.unique(grams, axis=0, return_index=True)
      for p in spec.primes[n - 2]:
        u, used = len(uniq), len(np.unique(rows[first, h]))
        ideal = 1 - p * (1 - (1 - 1 / p) ** u) / u  # expected collision rate of a random function
        out["heads"].append(dict(bits=bits, order=n, prime=p, ngrams=u, collision=1 - used / u, ideal=ideal))
        h += 1
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="V = 1e5 only, fewer repetitions")
  ap.add_argument("--meshes", nargs="+", default=["data=8", "data=2,expert=2,model=2"])
  ap.add_argument("--reps", type=int, default=None)
  ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "engram_lookup.json"))
  args = ap.parse_args(argv)
  sizes = [100_000] if args.quick else [100_000, 1_000_000, 4_000_000]
  reps = args.reps or (3 if args.quick else 7)
  print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices; head_dim {HEAD_DIM}, "
        f"ids [{BATCH}, {SEQ}, {HEADS}]; medians of {reps}")
  report = dict(head_dim=HEAD_DIM, ids_shape=[BATCH, SEQ, HEADS], reps=reps, lookup={})

  for mesh_spec in args.meshes:
    per_v = {}
    for v in sizes:
      per_v[v] = bench_lookup(mesh_spec, v, reps, STRATEGIES)
    report["lookup"][mesh_spec] = {str(v): r for v, r in per_v.items()}
    print(f"\n== mesh {mesh_spec}")
    print(f"{'V':>9} {'strategy':>14} {'fwd ms':>8} {'x base':>7} {'f+b ms':>8} {'x base':>7}  collectives (f+b)")
    for v, r in per_v.items():
      base = r["take"]
      for s, x in r.items():
        coll = ", ".join(f"{c['kind']} {c['bytes'] / 1024:.0f}K" for c in x["collectives"]) or "-"
        print(f"{v:>9} {s:>14} {x['fwd_ms']:8.2f} {x['fwd_ms'] / base['fwd_ms']:7.2f} "
              f"{x['fwdbwd_ms']:8.2f} {x['fwdbwd_ms'] / base['fwdbwd_ms']:7.2f}  {coll}")
    for s in STRATEGIES:  # does any collective's size depend on V (V vs 2V, and across the V measured)?
      sig = {v: sorted(c["bytes"] for c in per_v[v][s]["collectives"]) for v in sizes}
      scales = len({tuple(x) for x in sig.values()}) > 1 or any(per_v[v][s]["scales_with_V"] for v in sizes)
      report["lookup"][mesh_spec].setdefault("collectives_scale_with_V", {})[s] = scales
      print(f"  {s:>14}: collectives {'SCALE with V' if scales else 'independent of V'}"
            f" (largest {max(max(x, default=0) for x in sig.values()) / 2**20:.2f} MiB)")

  report["hashing"] = bench_hashing(reps)
  print("\n== hashing throughput ([64, 512] ids, N=3, K=8, with segment ids)")
  for k, x in report["hashing"].items():
    print(f"  {k}: numpy {x['numpy_tok_s'] / 1e6:.2f} M tok/s, jit {x['jit_tok_s'] / 1e6:.2f} M tok/s "
          f"(jit/numpy {x['jit_tok_s'] / x['numpy_tok_s']:.1f}x)")

  col = bench_collisions(100_000 if args.quick else 1_000_000)
  report["collisions"] = col
  if col:
    print(f"\n== hash collisions on {col['tokens']} corpus tokens (vocab {col['vocab']} -> {col['compressed_vocab']}, "
          f"{100 * col['reduction_ratio']:.1f}% compression)")
    for x in col["heads"]:
      print(f"  {x['bits']}bit order {x['order']} p={x['prime']}: {x['ngrams']} n-grams, collision "
            f"{100 * x['collision']:.2f}% (random function {100 * x['ideal']:.2f}%)")
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(report, indent=1))
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
