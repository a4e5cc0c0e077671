"""A run directory is a record: `load_model(path)` rebuilds the trained model with nothing but the path; eval needs
no model gin file; the compression map is data (one train-step compile for two MODEL_DIRs); an invalid config
leaves MODEL_DIR untouched; directories written before the record existed still load."""

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from engram_jax import checkpoint as ckpt_lib
from engram_jax import hashing, run_dir, sharding, train, vocab
from engram_jax.models.decoder import Decoder
from tiny_run import STEPS, tiny_model, tiny_run  # tests/ is on sys.path (pytest rootdir-relative import)


def _checkpoint_state(model_dir, step, compression):
  from engram_jax import steps
  setup = steps.make_setup(tiny_model(), tiny_run(None).optimizer, STEPS, sharding.make_mesh("data=-1"), compression)
  state, _ = ckpt_lib.Checkpointer(Path(model_dir) / "checkpoints").restore(step, setup.abstract)
  return jax.device_get(state)


def test_load_model_from_any_path_form_returns_the_checkpoint_and_its_record(straight, corpus):
  model_dir, _ = straight
  model, record = run_dir.load_model(model_dir)
  assert isinstance(model, Decoder) and record.step == STEPS and record.model_config == tiny_model()
  want = _checkpoint_state(model_dir, STEPS, record.compression)
  got = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want["params"])):
    np.testing.assert_array_equal(a, b)
  # the record: map, hash specs, tokenizer copy, data
  np.testing.assert_array_equal(record.compression, np.load(model_dir / "engram_compression.npy"))
  assert record.compression.dtype == np.int32 and hashing.reduction_ratio(record.compression) > 0
  assert record.hash_specs == {1: model.blocks[1].engram.spec}
  assert record.hash_specs[1].vocab_size == hashing.compressed_vocab_size(record.compression)
  tokenizer = Path(record.tokenizer_path)
  assert tokenizer.parent == model_dir and tokenizer.read_bytes() == (Path(corpus) / "spm.model").read_bytes()
  assert record.tokenizer_sha256 == hashlib.sha256(tokenizer.read_bytes()).hexdigest()
  assert (record.task, record.data_dir, record.seq_len) == ("engram_corpus_en", str(Path(corpus).absolute()), 32)
  saved = json.loads((model_dir / run_dir.RECORD_FILE).read_text())
  assert saved["hash_specs"]["1"]["offsets"] == record.hash_specs[1].offsets.tolist()
  # checkpoints/ and checkpoints/<step> name the same run; the step is honoured
  _, rec2 = run_dir.load_model(model_dir / "checkpoints")
  middle, rec3 = run_dir.load_model(model_dir / "checkpoints" / "6")
  assert rec2.step == STEPS and rec3.step == 6
  table6 = np.asarray(middle.blocks[1].engram.table[...])
  np.testing.assert_array_equal(table6, _checkpoint_state(model_dir, 6, record.compression)["params"]["blocks"][1]
                                ["engram"]["table"])


def test_load_model_onto_a_mesh_shards_by_annotation_and_computes_the_same(straight):
  model_dir, _ = straight
  mesh = sharding.make_mesh("data=4,model=2")
  local, _ = run_dir.load_model(model_dir)
  sharded, _ = run_dir.load_model(model_dir, mesh)
  table = sharded.blocks[1].engram.table[...]
  assert table.addressable_shards[0].data.shape[0] == table.shape[0] // 8  # rows split over all 8 devices
  tokens = np.random.default_rng(0).integers(0, 300, size=(8, 16)).astype(np.int32)
  np.testing.assert_allclose(np.asarray(sharded(tokens)[0]), np.asarray(local(tokens)[0]), rtol=2e-5, atol=2e-5)


def test_eval_cli_needs_no_model_gin_file(straight, tmp_path):
  from engram_jax import eval as eval_lib
  model_dir, result = straight
  out = eval_lib.main([f"--gin.CHECKPOINT_PATH={model_dir}", f"--gin.EVAL_OUTPUT_DIR={tmp_path}"])
  assert out["val_loss"] == result["final_val_loss"] and out["val_batches"] == 2
  assert json.loads((tmp_path / f"eval_step{STEPS}.json").read_text())["val_loss"] == out["val_loss"]


def test_rerun_keeps_the_record_as_first_written(straight, corpus):
  model_dir, _ = straight
  before = {n: (model_dir / n).read_bytes() for n in (run_dir.RECORD_FILE, run_dir.COMPRESSION_FILE)}
  train.train_and_evaluate(tiny_model(), tiny_run(corpus), model_dir)
  assert before == {n: (model_dir / n).read_bytes() for n in before}


def test_invalid_config_leaves_model_dir_untouched_and_the_fixed_rerun_trains(corpus, tmp_path):
  model_dir = tmp_path / "run"
  bad = tiny_model(engram=dataclasses.replace(tiny_model().engram, num_branches=2))
  with pytest.raises(ValueError, match=r"engram.num_branches=2 must equal hc_expansion=1"):
    train.train_and_evaluate(bad, tiny_run(corpus), model_dir)
  with pytest.raises(ValueError, match=r"EngramConfig.pad_id=400 is outside the raw vocabulary"):
    train.train_and_evaluate(tiny_model(engram=dataclasses.replace(tiny_model().engram, pad_id=400)),
                             tiny_run(corpus), model_dir)
  assert not model_dir.exists()
  result = train.train_and_evaluate(tiny_model(), tiny_run(corpus, stop_after=1), model_dir)
  assert result["steps"] == 1 and (model_dir / run_dir.RECORD_FILE).is_file()


def test_hash64_compressed_model_compiles_once_for_two_dirs_and_eval_matches_training(corpus, tmp_path):
  """hash_bits=64 multipliers depend on the compressed vocabulary size: eval must hash with training's map. Two
  MODEL_DIRs of one model shape share one compiled train step (the map is data, not part of ModelConfig)."""
  from jax import monitoring
  from jax._src import dispatch
  from engram_jax import eval as eval_lib
  config = tiny_model(num_layers=1, moe=None, engram_layers=(0,),  # small: x64 compiles slowly
                      engram=dataclasses.replace(tiny_model().engram, hash_bits=64))
  compiles = []

  def listen(event, duration, **kw):
    if event == dispatch.BACKEND_COMPILE_EVENT and kw.get("fun_name") == "jit(train_step)":
      compiles.append(kw["fun_name"])

  monitoring.register_event_duration_secs_listener(listen)
  try:
    results = [train.train_and_evaluate(config, tiny_run(corpus, stop_after=2, eval_every=2), tmp_path / name)
               for name in ("a", "b")]
  finally:
    monitoring.unregister_event_duration_listener(listen)
  assert compiles == ["jit(train_step)"]
  assert results[0]["val_curve"] == results[1]["val_curve"]  # same seed, same data, same map
  record = run_dir.read_record(tmp_path / "a")
  assert record.needs_x64 and hashing.compressed_vocab_size(record.compression) < config.vocab_size
  identity = run_dir.model_hash_specs(config, hashing.identity_compression(config.vocab_size))
  assert identity[0].multipliers != record.hash_specs[0].multipliers  # the identity map would read other rows
  evaluated = eval_lib.evaluate(tmp_path / "a", output_dir=tmp_path)
  assert evaluated["step"] == 2 and evaluated["val_loss"] == results[0]["final_val_loss"]


def test_directory_from_before_the_record_still_loads(straight, tmp_path):
  """Older runs: checkpoints/model_config.json (with the former engram_compression_path field) and the map file."""
  model_dir, _ = straight
  old = tmp_path / "old"
  shutil.copytree(model_dir, old)
  body = json.loads((old / run_dir.RECORD_FILE).read_text())
  (old / run_dir.RECORD_FILE).unlink()
  (old / run_dir.TOKENIZER_FILE).unlink()
  config = {**body["model_config"], "engram_compression_path": str(old / run_dir.COMPRESSION_FILE)}
  (old / "checkpoints" / ckpt_lib.CONFIG_FILE).write_text(json.dumps(config))
  model, record = run_dir.load_model(old / "checkpoints" / str(STEPS))
  new_model, new_record = run_dir.load_model(model_dir)
  assert record.model_config == new_record.model_config and record.tokenizer_path is None
  assert record.hash_specs == new_record.hash_specs
  tokens = np.arange(32, dtype=np.int32).reshape(2, 16)
  np.testing.assert_array_equal(np.asarray(model(tokens)[0]), np.asarray(new_model(tokens)[0]))


def test_tokenizer_is_checked_by_its_pieces_not_its_file_bytes(straight, corpus, tmp_path):
  """A rebuilt corpus with the same vocabulary continues a run (older builds embedded their build directory in the
  model file, so equal vocabularies had unequal bytes); another vocabulary is refused."""
  model_dir, _ = straight
  saved = run_dir.read_record(model_dir)
  assert saved.tokenizer_pieces_sha256 == vocab.sentencepiece_fingerprint((Path(corpus) / "spm.model").read_bytes())
  old = tmp_path / "old"  # a record written before the field: the fingerprint comes from the run's tokenizer copy
  shutil.copytree(model_dir, old, ignore=shutil.ignore_patterns("checkpoints"))
  body = json.loads((old / run_dir.RECORD_FILE).read_text())
  del body["tokenizer"]["pieces_sha256"]
  (old / run_dir.RECORD_FILE).write_text(json.dumps(body))
  assert run_dir.read_record(old).tokenizer_pieces_sha256 == saved.tokenizer_pieces_sha256
  run_dir.check_compatible(saved, dataclasses.replace(saved, tokenizer_sha256="0" * 64))
  with pytest.raises(ValueError, match=r"tokenizer pieces: \w{12} -> 111111111111 .*the corpus' vocabulary changed"):
    run_dir.check_compatible(saved, dataclasses.replace(saved, tokenizer_sha256="0" * 64,
                                                        tokenizer_pieces_sha256="1" * 64))


def test_load_model_errors_name_the_path(straight, tmp_path):
  model_dir, _ = straight
  with pytest.raises(ValueError, match=r"holds no run .*pass a MODEL_DIR"):
    run_dir.load_model(tmp_path)
  with pytest.raises(ValueError, match=r"no finished checkpoint 7 .*steps there: \[6, 12\]"):
    run_dir.load_model(model_dir / "checkpoints" / "7")
  assert not (model_dir / "checkpoints" / "7").exists()
