"""Every test runs on a fake 8-device CPU mesh; the flag must be set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

assert jax.device_count() == 8, "tests expect 8 fake CPU devices; was jax imported before conftest set XLA_FLAGS?"
