"""The base experiment config every `experiments/*.py` file starts from (big_vision `get_config` style).

Keys are grouped by pipeline stage; an experiment changes what differs from here. Values mirror the
official SRUM / BAGEL recipe unless noted (spec section E.6 and B.2).
"""
from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 42
  c.workdir = "outputs/run"

  # Model: a converted model directory (orbax + model_config.json) or a preset with random weights.
  c.model = ml_collections.ConfigDict()
  c.model.dir = ""  # `python -m srum_jax convert` output; empty -> random init of `preset`
  c.model.preset = "tiny"  # tiny | mid | bagel_7b_mot
  c.model.param_dtype = "float32"  # float32 | bfloat16
  c.model.compute_dtype = "bfloat16"
  c.model.attn_impl = "dense"  # dense | chunked
  c.model.remat = False

  # Device mesh and logical-axis rule overrides ([[logical, mesh_axes], ...] on top of DEFAULT_RULES).
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.sharding_rules = []

  # SRUM objective (spec E.1, E.2).
  c.srum = ml_collections.ConfigDict()
  c.srum.lambda_constraint = 0.5
  c.srum.signed_rewards = False
  c.srum.use_local = True  # region rewards
  c.srum.use_global = True  # global layout reward
  c.srum.drop_zero_global = True  # official formatting filter (E.3)

  # Post-training (spec E.6).
  c.train = ml_collections.ConfigDict()
  c.train.steps = 309
  c.train.lr = 2e-5
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.eps = 1e-15
  c.train.weight_decay = 0.0
  c.train.warmup_steps = 100
  c.train.grad_clip = 1.0
  c.train.timestep_shift = 1.0
  c.train.text_cond_dropout = 0.1
  c.train.batch_size = 2
  c.train.ema_decay = 0.0  # 0: no EMA (official SRUM)
  c.train.freeze = ("vit", "connector", "ae")  # top-level parameter groups held fixed
  c.train.save_every = 100
  c.train.keep_checkpoints = 2
  c.train.log_every = 10
  c.train.sample_every = 100  # PNG grid of training images with reward overlays (0: never)
  c.train.sft_baseline = False  # uniform rewards and lambda 0: plain flow matching on the same data
  c.train.sample_posterior = True  # VAE posterior sample (official) vs. its mean
  # Data: reward records (records.py schema) with image paths relative to images_root; "" -> records's folder.
  c.train.records = ""  # "" -> <workdir>/records.jsonl
  c.train.images_root = ""
  c.train.image_hw = (1024, 1024)  # training resolution (H, W); boxes are scaled from each image's size
  c.train.samples_per_row = 2  # T2I samples packed per row (official: ~2 per GPU at 8192 tokens)
  c.train.num_tokens = 8448  # static row budget: samples_per_row * (h*w latents) + text_capacity
  c.train.text_capacity = 256  # static text slots per row (BOS/EOS, prompt ids and the image markers)
  c.train.max_regions = 5  # regions per image (official SAM proposals: 5)
  c.train.data_threads = 4
  c.train.data_workers = 0  # >0: grain decodes in that many processes

  return c
