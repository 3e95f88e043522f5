"""The paper's recipe: SRUM post-training of BAGEL-7B-MoT on SRUM's T2I-CompBench train prompts.

    C=experiments/bagel_7b_compbench.py
    python -m srum_jax texts import --bagel_code=Bagel --srum_code=SRUM --out=texts.json  # README
    python -m srum_jax run --config=$C --config.model.dir=/ckpt/bagel7b \
        --config.texts.file=texts.json
    # SRUM's released set, as downloaded
    python -m srum_jax train --config=$C --config.model.dir=/ckpt/bagel7b \
        --config.texts.file=texts.json --config.train.records=SRUM_6k_CompBench_Train
    python -m srum_jax sweep --config=$C --dry_run   # lambda x lr grid
    python -m srum_jax run --config=$C:v5p ...   # on v5p: no remat, data-parallel inference

The recipe itself is the base config (`srum_jax/defaults.py`), each value from the official file
that sets it on the path SRUM ships:
* candidates: `srum_data_infer/compt2i.sh` -> `t2i_multi_gpu.py` -> `t2i.py` `main`: think mode, 50
  steps, text CFG 4.0 in (0.4, 1], shift 3.0, 1024^2, each image saved cropped to its non-black
  bounding box;
* regions and scores: `srum_data_infer/vlm.sh` -> `vlm_multi_gpu.py` (its argument defaults: the 10
  largest SAM masks, 5 attempts per question) -> `vlm.py` `main` (think prompt, greedy, 4096 / 1024
  new tokens);
* records: `vlm_format_output.py` (drops a global score of exactly 0);
* training: `scripts/train_reg_comp.sh` (lambda 0.5, AdamW lr 2e-5, 309 steps) with
  `scripts/data/rft_comp.yaml`'s image transform (aspect kept, sides 512-1024 in steps of 256: each
  image padded to the 1024^2 canvas) and `data/regional_reward_dataset.py`'s reward map;
* evaluation: `CompBench_eval/comp_eval_infer.sh` (think mode; `eval_generate.think=False` is the
  no-think row) and `qwen_eval.sh`'s overall (base categories plus one composite of the complex
  ones).

This file sets what the full-size model needs on top:
* the official texts (BAGEL's think system prompts, SRUM's judge prompts and evaluation question),
  from the file `texts import` writes; without `texts.file` a command stops and says how to make it
  (`texts.file=own`: the project's own wording, explicitly);
* prompts: SRUM's `train_comp.json` (10 categories, 6,234 prompts) and `val_comp.json` (2,670),
  shipped at the root of the official repository: the defaults read them from a checkout of it in
  `SRUM/` (the paths are config keys);
* the global batch of the official run, 16 images per update (8 GPUs x ~2 packed samples), as 16
  rows of one sample on the 1024^2 canvas, on any device count: FSDP over the devices, a derived
  tensor axis when there are more devices than rows (mesh.tensor 0), gradient accumulation when a
  device holds more rows than one microbatch;
* fp32 master weights with bf16 compute for training; bf16 weights for inference, tensor-parallel
  over each host's devices (4 chips hold the 14.6B parameters at ~7.3 GB each);
* attention chosen by platform in every stage (`auto`: splash on TPU, cuDNN / tokamax on GPU), remat
  in training.
"""
from srum_jax import defaults
from srum_jax.data.prompt_sources import prompt_source


def get_config(arg=None):
  """arg: none (any accelerator) or "v5p" (the recipe without remat, inference data-parallel)."""
  if arg not in (None, "", "v5p"):
    raise ValueError(f"unknown config arg {arg!r}; bagel_7b_compbench.py takes none or 'v5p'")
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
  c.prompts.train = prompt_source(source="file", path="SRUM/train_comp.json")  # the official repo's
  c.prompts.val = prompt_source(source="file", path="SRUM/val_comp.json")
  c.train.batch_size = 16  # rows of one image (on the 1024^2 canvas): the official 16 per update
  c.train.samples_per_row = 1
  c.train.num_tokens = 4096 + 256  # the canvas's 64x64 latent tokens + the text slots
  c.train.text_capacity = 256
  c.train.microbatch_rows = 1
  c.train.save_every = 308
  # FSDP matmuls without XLA TPU's collective matmul (whole all-gathers / reduce-scatters): by XLA's
  # own cost model the step moves ~40% fewer bytes (benchmarks/results_tpu_cost.txt)
  c.train.tpu_collective_matmul = False
  if arg == "v5p":  # 95 GB chips: the step without remat, inference with whole weights per chip
    c.model.remat = False
    c.inference_mesh.tensor = 1
  return c


def get_sweep(arg=None):
  """lambda x lr grid around the paper's point (0.5, 2e-5)."""
  if arg:
    raise ValueError(f"unknown config arg {arg!r}; bagel_7b_compbench.py takes none")
  return [{"srum.lambda_constraint": lam, "train.lr": lr}
          for lam in (0.1, 0.5, 1.0) for lr in (1e-5, 2e-5)]
