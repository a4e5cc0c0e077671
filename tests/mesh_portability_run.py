"""Run by tests/test_mesh_portability.py in a fresh process with 12 fake CPU devices: a run directory whose
checkpoint was saved on 1 device is loaded (run_dir.load_model) on meshes of 1, 2, 8 and 12 devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=12 python tests/mesh_portability_run.py OUT_DIR ROW_MULTIPLE

Prints one JSON line: per mesh size, the table rows and the logits of a fixed batch (or the error and how long it
took to raise)."""

import json
import os
import sys
import time

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from engram_jax import checkpoint as ckpt_lib  # noqa: E402
from engram_jax import run_dir, sharding, steps  # noqa: E402
from engram_jax.models.decoder import validate_config  # noqa: E402
from tiny_run import tiny_model, tiny_run  # noqa: E402


def save_on_one_device(model_dir: str, model, run) -> None:
  """The run record and the initial train state as checkpoint step 1, written on a 1-device mesh."""
  mesh = sharding.make_mesh("data=1", jax.devices()[:1])
  record = run_dir.begin_run(model_dir, model, run, None, None, False, mesh)
  setup = steps.make_setup(model, run.optimizer, run.steps, mesh, record.compression)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(model_dir, "checkpoints"))
  checkpointer.save(1, setup.init(jnp.int32(0)), {"position": 0})
  checkpointer.close()


def main(out_dir: str, multiple: int) -> None:
  from engram_jax.layers.engram_config import EngramConfig
  base = tiny_model()
  model = base.__class__(**{**base.__dict__, "engram": EngramConfig(**{**base.engram.__dict__,
                                                                        "table_row_multiple": multiple})})
  run = tiny_run(None, engram_compression="none", mesh="data=1")
  save_on_one_device(out_dir, model, run)
  tokens = np.random.default_rng(0).integers(0, 320, size=(24, 8)).astype(np.int32)  # B=24 splits over 1/2/8/12
  out = {}
  for n in (1, 2, 8, 12):
    mesh = sharding.make_mesh(f"data={n}", jax.devices()[:n])
    t0 = time.perf_counter()
    try:
      validate_config(model, mesh)  # what training checks first
      loaded, _ = run_dir.load_model(out_dir, mesh)
    except ValueError as e:
      out[n] = {"error": str(e), "seconds": time.perf_counter() - t0}
      continue
    table = loaded.blocks[1].engram.table[...]
    logits = loaded(jax.device_put(tokens, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))))[0]
    out[n] = {"rows": int(table.shape[0]), "row_shard": int(table.addressable_shards[0].data.shape[0]),
              "logits": np.asarray(logits, np.float64).round(7).tolist()}
  # a record whose table_row_multiple no longer matches the saved table (as after the older mesh-dependent
  # padding): a clear shape error, not a "corrupt" checkpoint
  path = os.path.join(out_dir, run_dir.RECORD_FILE)
  with open(path) as f:
    record = json.load(f)
  record["model_config"]["engram"]["table_row_multiple"] = 2 * multiple
  with open(path, "w") as f:
    json.dump(record, f)
  try:
    run_dir.load_model(out_dir)
  except Exception as e:  # noqa: BLE001 (the test checks the type)
    out["stale"] = {"type": type(e).__name__, "error": str(e)}
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]))
