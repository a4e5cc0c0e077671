"""A table of invalid settings (model, Engram, MoE, run, optimizer, mesh, data): each fails with the field named,
before anything compiles (no backend compile of any step is observed) and before MODEL_DIR is written."""

import dataclasses
import time

import pytest
from jax import monitoring

from engram_jax import optim, train
from engram_jax.run_config import RunConfig
from tiny_run import tiny_model, tiny_run  # tests/ is on sys.path (pytest rootdir-relative import)

E = tiny_model().engram
M = tiny_model().moe
O = tiny_run(None).optimizer
CASES = [  # (name, model overrides, run overrides, message)
    ("model vocab_size", dict(vocab_size=0), {}, r"ModelConfig.vocab_size=0 must be >= 1"),
    ("model d_model type", dict(d_model="32"), {}, r"ModelConfig.d_model='32': expected int"),
    ("model heads", dict(num_heads=3), {}, r"ModelConfig.num_heads=3 must be a multiple of num_kv_heads=2"),
    ("model head_dim odd", dict(head_dim=7), {}, r"ModelConfig.head_dim=7 must be even"),
    ("model dense layers", dict(num_dense_layers=5), {}, r"ModelConfig.num_dense_layers=5 must lie in"),
    ("model compute dtype", dict(compute_dtype="float16"), {}, r"ModelConfig.compute_dtype='float16'"),
    ("model hc expansion", dict(hc_expansion=0), {}, r"ModelConfig.hc_expansion=0 must be >= 1"),
    ("model hc variant", dict(hc_variant="xx"), {}, r"ModelConfig.hc_variant='xx'"),
    ("model engram layer range", dict(engram_layers=(5,)), {}, r"ModelConfig.engram_layers=\(5,\): \[5\] outside"),
    ("model engram layer twice", dict(engram_layers=(1, 1)), {}, r"ModelConfig.engram_layers=\(1, 1\) has dupl"),
    ("model engram missing", dict(engram=None), {}, r"ModelConfig.engram is None but engram_layers"),
    ("model vocab below data", dict(vocab_size=256), {}, r"set ModelConfig.vocab_size >= 3\d\d"),
    ("engram max_ngram", lambda: dict(engram=dataclasses.replace(E, max_ngram=1)), {}, r"EngramConfig.max_ngram=1"),
    ("engram base sizes", lambda: dict(engram=dataclasses.replace(E, table_base_sizes=(101,))), {},
     r"EngramConfig.table_base_sizes=\(101,\): needs one base size per order"),
    ("engram hash bits", lambda: dict(engram=dataclasses.replace(E, hash_bits=16)), {}, r"EngramConfig.hash_bits=16"),
    ("engram lookup", lambda: dict(engram=dataclasses.replace(E, lookup="gather")), {}, r"EngramConfig.lookup='gath"),
    ("engram branches", lambda: dict(engram=dataclasses.replace(E, num_branches=2)), {},
     r"ModelConfig.engram.num_branches=2 must equal hc_expansion=1"),
    ("engram pad id", lambda: dict(engram=dataclasses.replace(E, pad_id=400)), {}, r"EngramConfig.pad_id=400"),
    ("engram head_dim", lambda: dict(engram=dataclasses.replace(E, head_dim=-1)), {}, r"EngramConfig.head_dim=-1"),
    ("engram type", lambda: dict(engram=dataclasses.replace(E, heads_per_order=2.5)), {},
     r"EngramConfig.heads_per_order=2.5: expected int"),
    ("mesh engram table", lambda: dict(engram=dataclasses.replace(E, table_row_multiple=3)), {},
     r"the Engram table of layer 1 has 930 rows \(928 hashed rows padded to EngramConfig.table_row_multiple=3\), "
     r"which the mesh .* cannot split: .* make 8 shards"),
    ("moe top_k", dict(moe=dataclasses.replace(M, top_k=9)), {}, r"MoEConfig.top_k=9 must be <= num_experts=8"),
    ("moe dispatch", dict(moe=dataclasses.replace(M, dispatch="x")), {}, r"MoEConfig.dispatch='x'"),
    ("moe capacity", dict(moe=dataclasses.replace(M, capacity_factor=0.0)), {}, r"MoEConfig.capacity_factor=0.0"),
    ("moe score", dict(moe=dataclasses.replace(M, score_func="relu")), {}, r"MoEConfig.score_func='relu'"),
    ("moe type", dict(moe=dataclasses.replace(M, top_k=2.0)), {}, r"ModelConfig.moe.top_k=2.0: expected int"),
    ("run batch", {}, dict(batch_size=0), r"RunConfig.batch_size=0 must be >= 1"),
    ("run seed", {}, dict(seed=-1), r"RunConfig.seed=-1 must be >= 0"),
    ("run steps type", {}, dict(steps=10.5), r"RunConfig.steps=10.5: expected int"),
    ("run compute dtype", {}, dict(compute_dtype="fp8"), r"RunConfig.compute_dtype='fp8'"),
    ("run stop_after", {}, dict(stop_after=20), r"RunConfig.stop_after=20 must be in \[1, steps=12\]"),
    ("run on_nonfinite", {}, dict(on_nonfinite="ignore"), r"RunConfig.on_nonfinite='ignore'"),
    ("run data_dir type", {}, dict(data_dir=3), r"RunConfig.data_dir=3: expected"),
    ("optimizer lr", {}, lambda: dict(optimizer=dataclasses.replace(O, learning_rate=0.0)),
     r"OptimizerConfig.learning_rate=0.0 must be > 0"),
    ("optimizer table", {}, lambda: dict(optimizer=dataclasses.replace(O, table_optimizer="adagrad")),
     r"OptimizerConfig.table_optimizer='adagrad'"),
    ("optimizer type", {}, lambda: dict(optimizer=dataclasses.replace(O, warmup_steps="10")),
     r"OptimizerConfig.warmup_steps='10': expected int"),
    ("mesh size", {}, dict(mesh="data=3"), r"RunConfig.mesh='data=3': .*8 are available|RunConfig.mesh='data=3'"),
    ("mesh axis", {}, dict(mesh="tensor=8"), r"RunConfig.mesh='tensor=8': mesh spec: unknown axes \['tensor'\]"),
    ("mesh batch", {}, dict(batch_size=12), r"RunConfig.batch_size=12 \(BATCH_SIZE\) is not divisible by the 8"),
    ("mesh model axis", {}, dict(mesh="data=1,model=8"), r"ModelConfig.num_heads=4 must be divisible by the mesh's"),
    ("mesh expert dropless", {}, dict(mesh="data=4,expert=2"), r"MoEConfig.dispatch='dropless' has no expert par"),
    ("data task", {}, dict(task="no_such_task"), r"task_name='no_such_task' is not a registered seqio task"),
    ("data dir", {}, "not_a_corpus", r"holds \['notes.txt'\] but no readable manifest.json"),
    ("data seq_len", {}, dict(seq_len=0), r"RunConfig.seq_len=0"),
]


@pytest.fixture(scope="module")
def compiles():
  """Names of every backend compile that happens while this module runs."""
  seen = []

  def listen(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      seen.append(kw.get("fun_name"))

  monitoring.register_event_duration_secs_listener(listen)
  yield seen
  monitoring.unregister_event_duration_listener(listen)


def test_the_table_is_large_enough():
  assert len(CASES) >= 30


@pytest.mark.parametrize("name, model, run, message", CASES, ids=[c[0] for c in CASES])
def test_invalid_setting_fails_before_compiling_naming_the_field(name, model, run, message, corpus, tmp_path,
                                                                 compiles):
  if run == "not_a_corpus":
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    run = dict(data_dir=str(tmp_path / "data"))
  before, t0 = len(compiles), time.time()
  with pytest.raises((ValueError, TypeError), match=message):  # a config may already fail when it is built
    model = model() if callable(model) else model
    run = run() if callable(run) else run
    train.train_and_evaluate(tiny_model(**model), tiny_run(corpus, **run), tmp_path / "run")
  steps_compiled = [n for n in compiles[before:] if any(s in str(n) for s in ("train_step", "eval_step", "init"))]
  assert not steps_compiled, steps_compiled
  assert time.time() - t0 < 120  # loose: data may load, nothing compiles
  assert not (tmp_path / "run").exists()


def test_warmup_longer_than_the_run_is_a_warning_naming_the_fields():
  run = RunConfig(steps=50, optimizer=optim.OptimizerConfig(warmup_steps=100))
  assert run.warnings() == ["OptimizerConfig.warmup_steps=100 >= RunConfig.steps=50 (TRAIN_STEPS): the learning "
                            "rate never reaches its peak nor decays"]
  assert RunConfig(steps=500).warnings() == []
