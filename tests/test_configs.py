"""Every gin file in configs/ parses and builds its model (abstractly: nnx.eval_shape, so base sizes cost nothing);
gin mistakes fail with a message that names them, before anything is built."""

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from engram_jax import cli, configurables, sharding
from engram_jax.models.config import ModelConfig
from engram_jax.models.decoder import Decoder

REPO = Path(__file__).resolve().parent.parent
# configs/evals/ holds eval suites (python -m evals.run), built by tests/test_evals_run.py.
ALL_GIN = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.gin")
                 if p.parent.name != "evals")
TRAIN_MACROS = ["MODEL_DIR='/tmp/unused'", "TRAIN_STEPS=10"]


def resolve_models(rel: str) -> list[tuple[ModelConfig, str]]:
  """The (model config, mesh spec) pairs a gin file defines, the way its header says to run it."""
  kind = Path(rel).parts[1]
  if kind == "models":
    model, run, _ = configurables.resolve("train", [rel, "configs/runs/pretrain.gin"], TRAIN_MACROS)
  elif rel.endswith("runs/eval.gin"):  # no model: eval reads it from the run directory
    path, config, _ = configurables.resolve("evaluate", [rel], ["CHECKPOINT_PATH='/tmp/unused'"])
    assert path == "/tmp/unused" and config == configurables.EvalConfig()
    return []
  elif rel.endswith("runs/generate.gin"):  # decode and server settings; the model comes from the checkpoint
    from engram_jax import generate
    from engram_jax.decode import DecodeConfig
    (path, config, *_), rest = generate.resolve([f"--gin_file={rel}", "--gin.CHECKPOINT_PATH='/tmp/unused'"])
    assert path == "/tmp/unused" and isinstance(config, DecodeConfig) and rest == []
    return []
  elif kind == "runs":
    model, run, _ = configurables.resolve("train", ["configs/models/engram_moe_tiny.gin", rel], TRAIN_MACROS)
  elif "SweepConfig." in (REPO / rel).read_text():  # the sweep runner's files (also via include): one model per rho
    from engram_jax.experiments import sparsity_allocation as sweep_lib
    sweep, run, _ = sweep_lib.load_gin([rel])
    allocs = sweep_lib.plan_sweep(sweep, getattr(run, "seq_len", None))
    return [(a.config, "data=-1") for a in (allocs[0], allocs[-1])]  # (its run mesh targets 1 device)
  elif "ExperimentConfig." in (REPO / rel).read_text():  # ablation / infinite-memory experiments: every point
    from engram_jax.experiments import memory_experiments
    exp, run, _ = configurables.resolve("experiment", [rel], entry=cli.EXPERIMENT)
    return [(m, "data=-1") for _, m, _ in memory_experiments.plan(exp, run)]
  elif "PairConfig." in (REPO / rel).read_text():  # the Engram-off pair (python -m evals.engram_off_pair)
    from evals import engram_off_pair
    from evals.configurables import engram_off_pair_args
    configurables.parse([rel], entry=engram_off_pair.ENTRY)
    pair, model, run, _ = engram_off_pair_args()
    engram_off_pair.check_pair(model, run)
    return [(model, run.mesh), (engram_off_pair.moe_twin(model), run.mesh)]
  else:
    model, run, _ = configurables.resolve("train", [rel])
  return [(model, run.mesh)]


@pytest.mark.parametrize("rel", ALL_GIN)
def test_every_gin_file_parses_and_builds_its_model(rel):
  for model_config, mesh_spec in resolve_models(rel):
    assert isinstance(model_config, ModelConfig)
    mesh = sharding.make_mesh(mesh_spec)
    abstract = nnx.eval_shape(lambda: Decoder(model_config, mesh, rngs=nnx.Rngs(0)))
    params = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert sum(int(np.prod(p.shape)) for p in params) > model_config.vocab_size * model_config.d_model
    sharding.state_shardings(nnx.state(abstract), mesh)  # every parameter divides over the mesh


def test_config_headers_say_how_to_run_them():
  for rel in ALL_GIN:
    header = (REPO / rel).read_text().split("\n\n")[0]
    assert header.startswith("#") and ("python -m engram_jax." in header or "python -m evals." in header), rel


def test_quickstart_is_a_tiny_engram_moe_run():
  model, run, model_dir = configurables.resolve("train", ["configs/experiments/quickstart.gin"])
  assert model.moe is not None and model.engram_layers and model_dir
  assert run.task == "engram_corpus_en" and run.steps * run.batch_size * run.seq_len < 5_000_000


def test_unknown_parameter_fails_naming_it():
  with pytest.raises(configurables.GinConfigError, match=r"ModelConfig.d_modle = 3.*doesn't have a parameter "
                                                          r"named 'd_modle'"):
    configurables.resolve("train", ["configs/experiments/quickstart.gin"], ["ModelConfig.d_modle = 3"])


def test_unknown_configurable_and_misspelled_macro_fail():
  with pytest.raises(configurables.GinConfigError, match="No configurable matching 'ModelConfg'"):
    configurables.resolve("train", ["configs/experiments/quickstart.gin"], ["ModelConfg.d_model = 3"])
  with pytest.raises(configurables.GinConfigError, match="no macro 'TRAIN_STEP' is declared"):
    configurables.resolve("train", ["configs/experiments/quickstart.gin"], ["TRAIN_STEP = 3"])


def test_missing_required_macro_names_it():
  with pytest.raises(configurables.GinConfigError, match="MODEL_DIR"):
    configurables.resolve("train", ["configs/models/dense_tiny.gin", "configs/runs/pretrain.gin"], ["TRAIN_STEPS=3"])


def test_missing_gin_file_and_bad_flags():
  with pytest.raises(configurables.GinConfigError, match="gin file 'configs/nope.gin' not found"):
    configurables.resolve("train", ["configs/nope.gin"])
  with pytest.raises(SystemExit):
    cli.parse_flags(["--gin_file=configs/experiments/quickstart.gin", "--steps=3"])
  with pytest.raises(SystemExit):
    cli.parse_flags(["--gin.TRAIN_STEPS=3"])  # no gin file


def test_bad_field_value_fails_at_construction():
  with pytest.raises(configurables.GinConfigError, match=r"RunConfig.batch_size=0 must be >= 1"):
    configurables.resolve("train", ["configs/experiments/quickstart.gin"], ["BATCH_SIZE = 0"])


def test_flag_values_are_quoted_only_when_they_are_not_gin():
  files, bindings, _ = cli.parse_flags([
      "--gin_file=a.gin", "--gin.MODEL_DIR=/tmp/x y", "--gin.TRAIN_STEPS=30", "--gin.RunConfig.mesh='data=2'",
      "--gin.ModelConfig.moe=@MoEConfig()", "--gin.RunConfig.stop_after=None", "--gin.X=(1, 2)",
      "--gin.MIXTURE_OR_TASK_NAME=engram_corpus_en", "--gin.Y=%TRAIN_STEPS"])
  assert files == ["a.gin"]
  assert bindings == ["MODEL_DIR = '/tmp/x y'", "TRAIN_STEPS = 30", "RunConfig.mesh = 'data=2'",
                      "ModelConfig.moe = @MoEConfig()", "RunConfig.stop_after = None", "X = (1, 2)",
                      "MIXTURE_OR_TASK_NAME = 'engram_corpus_en'", "Y = %TRAIN_STEPS"]
