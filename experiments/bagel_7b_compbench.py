"""The paper's recipe: SRUM post-training of BAGEL-7B-MoT on SRUM's T2I-CompBench train prompts.

    python -m srum_jax texts import --bagel_code=Bagel --srum_code=SRUM --out=texts.json  # README
    python -m srum_jax run --config=experiments/bagel_7b_compbench.py --config.model.dir=/ckpt/bagel7b \
        --config.texts.file=texts.json \
        --config.prompts.train.path=/data/srum_train_comp.json --config.prompts.val.path=/data/srum_val_comp.json
    python -m srum_jax sweep --config=experiments/bagel_7b_compbench.py --dry_run   # lambda x lr grid

The recipe itself (lambda 0.5, AdamW lr 2e-5, 309 steps, think-mode candidates at 1024^2 with 50 steps and
CFG 4.0, SAM regions, the generate-mode self-judge) is the base config (`srum_jax/defaults.py`); this file
sets what the full-size model needs on top:
* the official texts (BAGEL's think system prompts, SRUM's judge prompts and evaluation question),
  from the file `texts import` writes; without `texts.file` a command stops and says how to make it
  (`texts.file=own`: the project's own wording, explicitly);
* prompts: SRUM's `srum_train_comp.json` (10 categories, 6,234 prompts) and `srum_val_comp.json` (2,670), the
  files the official SRUM code ships (download them from its repository; the paths are config keys);
* the global batch of the official run, 16 images of 1024^2 per update (8 GPUs x ~2 packed samples), as 16
  rows of one sample, on any device count: FSDP over the devices, a derived tensor axis when there are more
  devices than rows (mesh.tensor 0), gradient accumulation when a device holds more rows than one microbatch;
* fp32 master weights with bf16 compute for training; bf16 weights for inference, tensor-parallel over each
  host's devices (4 chips hold the 14.6B parameters at ~7.3 GB each);
* attention chosen by platform in every stage (`auto`: splash on TPU, cuDNN / tokamax on GPU), remat in training.
"""
from srum_jax import defaults
from srum_jax.data.prompt_sources import prompt_source


def get_config(arg=None):
  c = defaults.base_config()
  c.workdir = "outputs/bagel_7b_compbench"
  c.texts.require_official = True  # BAGEL's and SRUM's texts (README, "Official texts") or file=own
  c.model.preset = "bagel_7b_mot"
  c.model.param_dtype = "float32"
  c.model.inference_dtype = "bfloat16"
  c.model.compute_dtype = "bfloat16"
  c.model.attn_impl = "auto"
  c.model.remat = True
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 0
  c.inference_mesh.data, c.inference_mesh.tensor = -1, 4
  c.prompts.train = prompt_source(source="file", path="srum_data/srum_train_comp.json")
  c.prompts.val = prompt_source(source="file", path="srum_data/srum_val_comp.json")
  c.train.batch_size = 16  # rows of one 1024^2 image: the official 16 images per update
  c.train.samples_per_row = 1
  c.train.num_tokens = 4096 + 256  # 64x64 latent tokens + the text slots
  c.train.text_capacity = 256
  c.train.microbatch_rows = 1
  c.train.save_every = 308
  return c


def get_sweep(arg=None):
  """lambda x lr grid around the paper's point (0.5, 2e-5)."""
  return [{"srum.lambda_constraint": lam, "train.lr": lr}
          for lam in (0.1, 0.5, 1.0) for lr in (1e-5, 2e-5)]
