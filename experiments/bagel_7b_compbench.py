"""The paper's recipe: SRUM post-training of BAGEL-7B-MoT on T2I-CompBench train prompts.

    python -m srum_jax run --config=experiments/bagel_7b_compbench.py --config.model.dir=/ckpt/bagel7b
    python -m srum_jax sweep --config=experiments/bagel_7b_compbench.py --dry_run   # lambda x lr grid

The recipe itself (lambda 0.5, AdamW lr 2e-5, 309 steps, think-mode candidates at 1024^2 with 50 steps and
CFG 4.0, SAM regions, the generate-mode self-judge) is the base config (`srum_jax/defaults.py`); this file
sets what the full-size model needs on top: its preset, bf16, the chunked attention, remat and FSDP.
"""
from srum_jax import defaults


def get_config(arg=None):
  c = defaults.base_config()
  c.workdir = "outputs/bagel_7b_compbench"
  c.model.preset = "bagel_7b_mot"
  c.model.param_dtype = "bfloat16"
  c.model.compute_dtype = "bfloat16"
  c.model.attn_impl = "chunked"
  c.model.remat = True
  c.mesh.data = 1
  c.mesh.fsdp = -1  # FULL_SHARD over all devices, as the official 8-GPU FSDP run
  c.train.save_every = 308
  return c


def get_sweep(arg=None):
  """lambda x lr grid around the paper's point (0.5, 2e-5)."""
  return [{"srum.lambda_constraint": lam, "train.lr": lr}
          for lam in (0.1, 0.5, 1.0) for lr in (1e-5, 2e-5)]
