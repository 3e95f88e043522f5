"""The paper's recipe: SRUM post-training of BAGEL-7B-MoT on T2I-CompBench train prompts (spec E.6).

    python -m srum_jax run --config=experiments/bagel_7b_compbench.py --config.model.dir=/ckpt/bagel7b
    python -m srum_jax sweep --config=experiments/bagel_7b_compbench.py --dry_run   # lambda x lr grid
"""
from srum_jax import defaults


def get_config(arg=None):
  c = defaults.base_config()
  c.workdir = "outputs/bagel_7b_compbench"
  c.model.preset = "bagel_7b_mot"
  c.model.dir = ""  # set to the `python -m srum_jax convert` output of BAGEL-7B-MoT
  c.model.param_dtype = "bfloat16"
  c.model.compute_dtype = "bfloat16"
  c.model.attn_impl = "chunked"
  c.model.remat = True
  c.mesh.data = 1
  c.mesh.fsdp = -1  # FULL_SHARD over all devices, as the official 8-GPU FSDP run
  # Data generation (t2i.py: think mode, 50 steps, cfg text 4.0 / img 1.0, interval [0.4, 1], shift 3.0).
  c.prompts.train.split = "train"
  c.prompts.val.split = "val"
  c.generate.think = True
  c.generate.num_timesteps = 50
  c.generate.cfg_text_scale = 4.0
  c.generate.timestep_shift = 3.0
  c.generate.height = c.generate.width = 1024
  c.propose.name = "sam"
  c.propose.options.weights_dir = ""  # a local transformers SAM (ViT-H) directory
  c.score.mode = "generate"
  c.score.think = True
  c.eval.judge = "self"  # or hf_vlm with eval.hf_vlm_dir
  c.srum.lambda_constraint = 0.5
  c.train.steps = 309
  c.train.lr = 2e-5
  c.train.save_every = 308
  c.train.image_hw = (1024, 1024)
  c.train.samples_per_row = 2
  c.train.freeze = ("vit", "connector", "ae")
  return c


def get_sweep(arg=None):
  """lambda x lr grid around the paper's point (0.5, 2e-5)."""
  return [{"srum.lambda_constraint": lam, "train.lr": lr}
          for lam in (0.1, 0.5, 1.0) for lr in (1e-5, 2e-5)]
