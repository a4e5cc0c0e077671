"""The tiny Engram+MoE model and run shared by the training tests (one compiled train step per process: setups
are cached per model/optimizer/steps/mesh/compression map)."""

from engram_jax import optim
from engram_jax.layers.engram_config import EngramConfig
from engram_jax.layers.moe_config import MoEConfig
from engram_jax.models.config import ModelConfig
from engram_jax.run_config import RunConfig

STEPS = 12


def tiny_model(**overrides) -> ModelConfig:
  """configs/models/engram_moe_tiny.gin with the CLI test's overrides."""
  base = dict(vocab_size=320, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, dense_hidden=64,
              num_dense_layers=1, tie_embeddings=True,
              moe=MoEConfig(num_experts=8, num_shared_experts=1, top_k=2, expert_hidden=32, dispatch="dropless",
                            bias_update_rate=0.01),
              engram_layers=(1,), engram=EngramConfig(max_ngram=3, heads_per_order=4, head_dim=8,
                                                      table_base_sizes=(101, 101)))
  return ModelConfig(**{**base, **overrides})


def tiny_run(corpus, **overrides) -> RunConfig:
  base = dict(steps=STEPS, batch_size=8, seq_len=32, eval_every=6, eval_batches=2, checkpoint_every=6, log_every=1,
              data_dir=corpus, optimizer=optim.OptimizerConfig(learning_rate=3e-3, warmup_steps=2))
  return RunConfig(**{**base, **overrides})
