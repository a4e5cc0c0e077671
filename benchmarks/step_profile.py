"""Where a train step's time goes: per-stage forward+backward times and XLA FLOPs against the measured matmul peak.

    .venv/bin/python benchmarks/step_profile.py [--rounds 5] [--batch 16] [--seq 256] [--models sweep_moe quickstart]

One run measures, round-robin (one call of every item in turn, so load from other processes falls on all alike):
  peak         a 2048^3 float32 jnp.dot (the machine's matmul peak, same process, same load);
  stages       each stage of each model as its own jitted forward+backward (a fixed random cotangent), on the
               model's own weights and shapes: embedding, attention (one block), dense FFN, MoE router, dispatch,
               expert matmuls, combine, shared expert, the whole MoE, Engram (hash, lookup, gate+value, short conv,
               the whole layer), final norm + LM head + loss, optimizer update;
  step         the real train step (engram_jax.steps.make_setup), every variant of each model (the MoE's
               capacity slots 'sorted' vs 'onehot', dropless 'blocked' vs 'ragged_dot'), their losses compared.
Per item: median wall ms, median process CPU s (all threads; robust to load), XLA's FLOP count of the compiled
function (cost_analysis) and GFLOP/s (wall and per CPU-second) as a fraction of the matmul's in the same run.
Models: sweep_moe / sweep_engram (configs/experiments/sparsity_allocation_cpu.gin at rho 1 and 0.8) and quickstart
(configs/experiments/quickstart.gin: engram_moe_tiny, identity compression). JSON: benchmarks/results/step_profile.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from packed_rows import packed_layout  # noqa: E402

PEAK_N = 2048


def model_configs(seq: int) -> dict:
  """name -> ModelConfig of the profiled models."""
  import train_step  # noqa: PLC0415

  from engram_jax import configurables  # noqa: PLC0415

  sweep = {n: c for n, c, _ in train_step.variants([0.8], seq=seq)}
  quick, _, _ = configurables.resolve("train", [os.path.join(ROOT, "configs/experiments/quickstart.gin")])
  return {"sweep_moe": sweep["moe"], "sweep_engram": sweep["engram_moe_rho0.8"], "quickstart": quick}


def packed_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict:
  """Random packed rows (documents of 32..seq tokens), as the data pipeline produces them."""
  rng = np.random.default_rng(seed)
  seg, pos = packed_layout(rng, batch, seq)
  return {"targets": rng.integers(3, vocab, (batch, seq)).astype(np.int32), "segment_ids": seg, "positions": pos}


def fwd_bwd(fn, *args, grad: bool = True):
  """Jitted forward+backward of fn(*args) with a fixed random cotangent on its (float) output: grads w.r.t. every
  float leaf of args. grad=False: forward only (for integer work such as hashing)."""
  if not grad:
    return jax.jit(fn)
  out = jax.eval_shape(fn, *args)
  cts = jax.tree.map(lambda o, k: jax.random.normal(k, o.shape, o.dtype), out,
                     _keys(len(jax.tree.leaves(out)), jax.tree.structure(out)))

  def f(*a):
    floats = [i for i, x in enumerate(a) if any(jnp.issubdtype(l.dtype, jnp.floating) for l in jax.tree.leaves(x))]
    def g(*fl):
      b = list(a)
      for i, x in zip(floats, fl):
        b[i] = x
      return fn(*b)
    _, vjp = jax.vjp(g, *[a[i] for i in floats])
    return vjp(cts)
  return jax.jit(f)


def _keys(n, treedef):
  return jax.tree.unflatten(treedef, list(jax.random.split(jax.random.key(7), n)))


def module_fn(module, method):
  """(state, *inputs) -> method(merged module, *inputs): a module call as a pure function of its state."""
  graphdef, state = nnx.split(module)
  def fn(st, *inputs):
    return method(nnx.merge(graphdef, st), *inputs)
  return fn, state


def stages(config, batch: dict):
  """name -> (jitted fn, args, times per step) of one model's stages, on its own weights and a real batch."""
  from engram_jax import losses, steps  # noqa: PLC0415
  from engram_jax.layers import engram as engram_lib  # noqa: PLC0415
  from engram_jax.layers import moe as moe_lib  # noqa: PLC0415

  model = steps.build_model(config, None, 0)
  b, s, d = batch["targets"].shape + (config.d_model,)
  tokens = losses.shift_right(jnp.asarray(batch["targets"]), jnp.asarray(batch["segment_ids"]))
  seg, pos = jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["positions"])
  mask = seg > 0
  x = jax.random.normal(jax.random.key(1), (b, s, d))  # [B, S, D]
  h = x[:, :, None, :]  # [B, S, G=1, D]
  out = {}
  out["embedding"] = (fwd_bwd(lambda e, t: e[t], model.embed[...], tokens), (model.embed[...], tokens), 1)
  blocks = list(model.blocks)
  att = blocks[0]
  fn, st = module_fn(att, lambda m, v: m.attn(m.attn_norm(v), pos, seg))
  out["attention"] = (fwd_bwd(fn, st, x), (st, x), len(blocks))
  dense = [bl for bl in blocks if not bl.is_moe]
  if dense:
    fn, st = module_fn(dense[0], lambda m, v: m.ffn(m.ffn_norm(v)))
    out["dense_ffn"] = (fwd_bwd(fn, st, x), (st, x), len(dense))
  moes = [bl for bl in blocks if bl.is_moe]
  if moes:
    m = moes[0].ffn
    c = m.config
    n = len(moes)
    fn, st = module_fn(moes[0], lambda blk, v: blk.ffn(blk.ffn_norm(v), mask)[0])
    out["moe_total"] = (fwd_bwd(fn, st, x), (st, x), n)
    xt = x.reshape(b * s, d)  # [T, D]
    w = (m.w_router[...], m.bias[...], m.w_gate[...], m.w_up[...], m.w_down[...])
    route = lambda wr, v: moe_lib.route(v, wr, w[1], top_k=c.top_k, score_func=c.score_func,
                                        norm_topk=c.norm_topk)[0]
    out["moe_router"] = (fwd_bwd(route, w[0], xt), (w[0], xt), n)
    weights, experts, _ = moe_lib.route(xt, w[0], w[1], top_k=c.top_k, score_func=c.score_func)
    weights = weights * mask.reshape(-1)[:, None]
    for name, fns in dispatch_stages(c, b * s, experts, mask.reshape(-1)).items():
      dispatch, experts_fn, combine = fns
      buf = dispatch(xt)
      y = experts_fn(buf, *w[2:])
      out[f"moe_dispatch[{name}]"] = (fwd_bwd(dispatch, xt), (xt,), n)
      out[f"moe_experts[{name}]"] = (fwd_bwd(experts_fn, buf, *w[2:]), (buf,) + w[2:], n)
      out[f"moe_combine[{name}]"] = (fwd_bwd(combine, y, weights), (y, weights), n)
    if m.shared is not None:
      fn, st = module_fn(m.shared, lambda sh, v: sh(v))
      out["moe_shared"] = (fwd_bwd(fn, st, x), (st, x), n)
  for i, bl in enumerate(blocks):
    if bl.engram is None:
      continue
    en = bl.engram
    hash_ids = en.hash(tokens, seg)  # [B, S, H]
    out["engram_hash"] = (fwd_bwd(en.hash, tokens, seg, grad=False), (tokens, seg), 1)
    rows = en.flat_rows(hash_ids)
    out["engram_lookup"] = (fwd_bwd(lambda tab, r: jnp.take(tab, r, axis=0, mode="clip"), en.table[...], rows),
                            (en.table[...], rows), 1)
    e = jnp.take(en.table[...], rows, axis=0).reshape(b, s, -1)  # [B, S, E]
    p = en.core_weights()
    gv = lambda pp, hh, ee: engram_lib.gate_and_value(pp, hh, ee, en.config.gate_eps)
    out["engram_gate_value"] = (fwd_bwd(gv, p, h, e), (p, h, e), 1)
    if en.config.short_conv:
      p = dict(p, conv_weight=p["conv_weight"] + 0.1)  # a trained (non-zero) kernel
      for impl in getattr(engram_lib, "CONV_IMPLS", (None,)):
        kw = {} if impl is None else {"impl": impl}
        conv = lambda pp, v, kw=kw: engram_lib.short_conv(v, pp["conv_weight"], pp["conv_norm"], en.dilation,
                                                         seg, **kw)[0]
        out[f"engram_conv[{impl or 'taps'}]"] = (fwd_bwd(conv, p, h), (p, h), 1)
    fn, st = module_fn(en, lambda mm, hh, t: mm(hh, t, seg))
    out["engram_total"] = (fwd_bwd(fn, st, h, tokens), (st, h, tokens), 1)
    break

  def head_loss(st, v):
    mm = nnx.merge(gd, st)
    logits = mm.head(v)
    return losses.cross_entropy(logits, jnp.asarray(batch["targets"]), mask)[0]
  gd, st = nnx.split(model)
  out["head_loss"] = (fwd_bwd(head_loss, st, x), (st, x), 1)
  return out


def dispatch_stages(c, tokens: int, experts, mask) -> dict:
  """name -> (dispatch(x [T, D]) -> buffer, experts(buffer, w_gate, w_up, w_down) -> y, combine(y, weights [T, k])
  -> [T, D]) of the MoE paths this config can take, routing (experts [T, k], mask [T]) fixed."""
  from engram_jax.layers import moe as moe_lib  # noqa: PLC0415

  e = c.num_experts
  if c.dispatch == "dropless":
    k = experts.shape[1]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    def ragged(xs, wg, wu, wd):
      hh = jax.nn.silu(jax.lax.ragged_dot(xs, wg, sizes)) * jax.lax.ragged_dot(xs, wu, sizes)
      return jax.lax.ragged_dot(hh, wd, sizes)
    def blocked(xs, wg, wu, wd):
      return moe_lib._blocked_swiglu(xs, flat[order], sizes, wg, wu, wd, 128)
    def unsort(ys, wts):
      yy = jnp.zeros_like(ys).at[order].set(ys).reshape(experts.shape + ys.shape[-1:])
      return jnp.einsum("tkd,tk->td", yy, wts)
    return {"dropless_blocked": (lambda x: x[order // k], blocked, unsort),
            "dropless_ragged_dot": (lambda x: x[order // k], ragged, unsort)}
  cap = moe_lib.capacity_per_expert(tokens, c.top_k, e, c.capacity_factor)
  out = {}
  for impl in getattr(moe_lib, "CAPACITY_IMPLS", (None,)):
    kw = {} if impl is None else {"impl": impl}
    def dispatch(x, kw=kw):  # slots are part of dispatch (integer work, no gradient)
      slot, kept = moe_lib.capacity_slots(experts, e, cap, mask, **kw)
      slot = jnp.where(kept, slot, cap)
      src = jnp.broadcast_to(x[:, None, :], experts.shape + x.shape[-1:])
      return jnp.zeros((e, cap, x.shape[-1]), x.dtype).at[experts, slot].set(src, mode="drop")
    slot, kept = moe_lib.capacity_slots(experts, e, cap, mask, **kw)
    slot = jnp.where(kept, slot, cap)
    def combine(y, wts, slot=slot, kept=kept):
      g = y.at[experts, slot].get(mode="fill", fill_value=0)
      return jnp.einsum("tkd,tk->td", g, wts * kept)
    out[f"capacity{'' if impl is None else '_' + impl}"] = (dispatch, moe_lib._expert_swiglu, combine)
  return out


def flops_of(compiled) -> float:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float((ca or {}).get("flops", 0.0))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=5, help="timed round-robin rounds (after 1 warm-up)")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--models", nargs="+", default=["sweep_moe", "sweep_engram", "quickstart"])
  p.add_argument("--no-stages", action="store_true", help="time only the peak and the whole steps")
  p.add_argument("--json", default=os.path.join(ROOT, "benchmarks/results/step_profile.json"))
  args = p.parse_args(argv)

  import train_step  # noqa: PLC0415

  from engram_jax import budget  # noqa: PLC0415
  from engram_jax.experiments.sparsity_allocation import software_versions  # noqa: PLC0415

  configs = {k: v for k, v in model_configs(args.seq).items() if k in args.models}
  items = {}  # name -> dict(fn, args, count, model, flops)
  a = jnp.ones((PEAK_N, PEAK_N), jnp.float32)
  mm = jax.jit(lambda u, v: jnp.dot(u, v))
  items["peak_matmul"] = {"fn": mm, "args": (a, a), "count": 1, "model": "-",
                          "flops": flops_of(mm.lower(a, a).compile())}
  for mname, cfg in configs.items():
    data = packed_batch(cfg.vocab_size, args.batch, args.seq)
    for vname, vcfg in step_variants(cfg).items():
      print(f"compiling {mname} step [{vname}] ...", flush=True)
      built = train_step.build(vcfg, "adam", args.batch, args.seq)
      st = {"state": built["state"]}
      def step(st=st, built=built):
        st["state"], m = built["step"](st["state"], built["batch"])
        st["loss"] = m["loss"]
        return m
      items[f"{mname}/step[{vname}]"] = {
          "fn": step, "args": (), "count": 1, "model": mname, "flops": flops_of(built["step"]), "state": st,
          "budget_flops": budget.compute_budget(vcfg, args.seq).flops_per_token * args.batch * args.seq}
      if vname == "default":
        items[f"{mname}/optimizer"] = {"fn": built["parts"]["update"], "args": (built["state"],), "count": 1,
                                       "model": mname, "flops": None, "live": st}
    if args.no_stages:
      continue
    print(f"compiling {mname} stages ...", flush=True)
    for sname, (fn, fargs, count) in stages(cfg, data).items():
      items[f"{mname}/{sname}"] = {"fn": fn, "args": fargs, "count": count, "model": mname,
                                   "flops": flops_of(fn.lower(*fargs).compile())}
  times = {k: ([], []) for k in items}
  for rnd in range(args.rounds + 1):
    for k, it in items.items():
      fargs = (it["live"]["state"],) if "live" in it else it["args"]
      t, c = time.perf_counter(), time.process_time()
      jax.block_until_ready(it["fn"](*fargs))
      if rnd:
        times[k][0].append(time.perf_counter() - t)
        times[k][1].append(time.process_time() - c)
    print(f"round {rnd} done (load average {os.getloadavg()[0]:.1f})", flush=True)

  rows = []
  for k, it in items.items():
    wall, cpu = statistics.median(times[k][0]), statistics.median(times[k][1])
    rows.append({"item": k, "model": it["model"], "count": it["count"], "wall_ms": 1e3 * wall, "cpu_s": cpu,
                 "wall_ms_all": [1e3 * x for x in times[k][0]], "xla_flops": it["flops"],
                 "budget_flops": it.get("budget_flops"),
                 "loss": float(it["state"]["loss"]) if "state" in it else None})
  peak = rows[0]
  peak_w, peak_c = peak["xla_flops"] / peak["wall_ms"] * 1e3, peak["xla_flops"] / peak["cpu_s"]
  for r in rows:
    fl = r["xla_flops"]
    r["gflops_wall"] = fl / r["wall_ms"] * 1e-6 if fl else None
    r["frac_peak_wall"] = fl / r["wall_ms"] * 1e3 / peak_w if fl else None
    r["frac_peak_cpu"] = fl / r["cpu_s"] / peak_c if fl else None
    if r["budget_flops"]:
      r["budget_frac_peak_wall"] = r["budget_flops"] / r["wall_ms"] * 1e3 / peak_w
      r["budget_frac_peak_cpu"] = r["budget_flops"] / r["cpu_s"] / peak_c
      r["tokens_per_s"] = args.batch * args.seq / r["wall_ms"] * 1e3
  table = format_table(rows, peak_w, peak_c)
  head = (f"train-step profile, batch {args.batch} x seq {args.seq}, median of {args.rounds} round-robin rounds, "
          f"1 CPU device ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}); matmul peak "
          f"{peak_w / 1e9:.1f} GFLOP/s wall, {peak_c / 1e9:.1f} GFLOP per CPU-second")
  print(f"\n{head}\n{table}")
  os.makedirs(os.path.dirname(args.json), exist_ok=True)
  result = {"command": " ".join([sys.executable] + sys.argv), "versions": software_versions(),
            "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor()},
            "load_average": os.getloadavg(), "batch": args.batch, "seq": args.seq, "rounds": args.rounds,
            "peak_gflops_wall": peak_w / 1e9, "peak_gflop_per_cpu_s": peak_c / 1e9, "header": head, "table": table,
            "rows": rows}
  with open(args.json, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.json}")
  return result


def step_variants(cfg) -> dict:
  """The model as configured ('default') and the previous implementations it can select, for before/after."""
  out = {"default": cfg}
  if cfg.moe is not None and cfg.moe.dispatch == "capacity":
    out["capacity_onehot"] = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, capacity_impl="onehot"))
  if cfg.moe is not None and cfg.moe.dispatch == "dropless":
    out["ragged_dot"] = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dropless_impl="ragged_dot"))
  return out


def format_table(rows, peak_w, peak_c) -> str:
  head = (f"{'item':<44} {'x':>2} {'wall ms':>9} {'cpu s':>7} {'XLA GFLOP':>9} {'GFLOP/s':>8} {'%peak':>6} "
          f"{'%peak cpu':>9} {'loss':>8}")
  lines = [head, "-" * len(head)]
  for r in rows:
    fl = r["xla_flops"]
    lines.append(f"{r['item']:<44} {r['count']:2d} {r['wall_ms']:9.1f} {r['cpu_s']:7.3f} "
                 f"{(fl or 0) / 1e9:9.3f} {(r['gflops_wall'] or 0):8.2f} {100 * (r['frac_peak_wall'] or 0):6.1f} "
                 f"{100 * (r['frac_peak_cpu'] or 0):9.1f} {r['loss'] if r['loss'] is not None else '':>8}")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
