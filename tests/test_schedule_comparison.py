"""WSD vs cosine pairing: runs matched by (rho, seed, steps) over full lengths and budget branches, gaps and
rho-to-MoE gaps under both schedules, and a refusal when the pair's model or data differ."""

import json

import pytest

from engram_jax.experiments import schedule_comparison as sc


def record(rho, seed, steps, loss, budgets=None, d_model=64, batch_size=16):
  curve = [[0, 9.0], [steps, loss]]
  rec = {"rho": rho, "seed": seed, "model_config": {"d_model": d_model, "moe": {"num_experts": int(10 * rho)}},
         "run_config": {"batch_size": batch_size, "seq_len": 32, "seed": seed},
         "train": {"steps": steps, "final_val_loss": loss, "val_curve": curve}}
  if budgets:
    rec["budgets"] = {str(t): {"steps": t, "final_val_loss": x, "val_curve": [[t, x]]} for t, x in budgets.items()}
  return rec


def write(sweep_dir, records, pooled=None):
  for r in records:
    d = sweep_dir / f"rho{r['rho']:.3f}_seed{r['seed']}"
    d.mkdir(parents=True)
    (d / "sweep_result.json").write_text(json.dumps(r))
  if pooled is not None:
    (sweep_dir / "results.json").write_text(json.dumps({"analysis": {"pooled_seed_std": pooled}}))


def test_pairs_full_runs_and_branches_with_gaps_and_rho_gaps(tmp_path):
  wsd = [record(1.0, 0, 40, 4.50, {10: 5.10}), record(0.8, 0, 40, 4.45, {10: 5.12})]
  for r in wsd:  # a field a later version added (the cosine records lack it) does not block the pairing
    r["model_config"]["moe"]["capacity_impl"] = "sorted"
  write(tmp_path / "wsd", wsd)
  write(tmp_path / "cos10", [record(1.0, 0, 10, 5.20), record(0.8, 0, 10, 5.21), record(0.6, 0, 10, 5.3)], 0.01)
  write(tmp_path / "cos40", [record(1.0, 0, 40, 4.54), record(0.8, 0, 40, 4.50)], 0.004)
  res = sc.main(["--wsd", str(tmp_path / "wsd"), "--cosine", str(tmp_path / "cos10"), str(tmp_path / "cos40")])
  got = {(p["rho"], p["steps"]): p for p in res["pairs"]}
  assert set(got) == {(1.0, 10), (0.8, 10), (1.0, 40), (0.8, 40)}  # rho 0.6 has no WSD run
  assert got[(0.8, 10)]["gap"] == pytest.approx(5.12 - 5.21)
  assert got[(0.8, 10)]["gap_in_seed_std"] == pytest.approx((5.12 - 5.21) / 0.01)
  assert got[(1.0, 40)]["gap_in_seed_std"] == pytest.approx((4.50 - 4.54) / 0.004)
  assert got[(1.0, 40)]["tokens"] == 40 * 16 * 32
  gaps = {(g["rho"], g["steps"]): g for g in res["rho_gaps"]}
  assert gaps[(0.8, 10)]["wsd"] == pytest.approx(0.02) and gaps[(0.8, 10)]["cosine"] == pytest.approx(0.01)
  assert gaps[(0.8, 40)]["wsd"] == pytest.approx(-0.05) and gaps[(0.8, 40)]["cosine"] == pytest.approx(-0.04)
  on_disk = json.loads((tmp_path / "wsd" / "vs_cosine.json").read_text())
  assert on_disk["pairs"] == res["pairs"] and (tmp_path / "wsd" / "vs_cosine.png").stat().st_size > 0
  assert "| 0.800 | 0 | 10 |" in sc.table(res)


@pytest.mark.parametrize("change,match", [(dict(d_model=32), "model configs differ"),
                                          (dict(batch_size=8), "RunConfig.batch_size differs")])
def test_a_pair_with_other_model_or_data_is_refused(tmp_path, change, match):
  write(tmp_path / "wsd", [record(1.0, 0, 40, 4.5, {10: 5.1})])
  write(tmp_path / "cos", [record(1.0, 0, 10, 5.2, **change)])
  with pytest.raises(ValueError, match=match):
    sc.compare(str(tmp_path / "wsd"), [str(tmp_path / "cos")])


def test_no_overlap_names_the_directories(tmp_path):
  write(tmp_path / "wsd", [record(1.0, 0, 40, 4.5)])
  write(tmp_path / "cos", [record(1.0, 1, 40, 4.5)])
  with pytest.raises(ValueError, match="has a cosine run"):
    sc.compare(str(tmp_path / "wsd"), [str(tmp_path / "cos")])
