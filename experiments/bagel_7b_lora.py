"""SRUM post-training of BAGEL-7B-MoT with LoRA adapters on the generation expert, on one
accelerator.

    # the memory plan: benchmarks/results_aot_compile_tpu.txt
    TPU_SKIP_MDS_QUERY=1 python benchmarks/aot_compile.py --target tpu:v5p:1x1x1 --single_host \
        --programs train --config experiments/bagel_7b_lora.py
    # a v6e-8 host
    ... --target tpu:v6e:2x4 --single_host --config experiments/bagel_7b_lora.py:v6e

The paper's update (16 images of 1024^2 per update, SRUM's loss and lambda) with only low-rank
adapters trained: rank-32 adapters (alpha 32) on the generation expert's attention q/k/v/o and MLP
gate/up/down, in fp32 master weights with AdamW state; the whole base model (both experts, ViT, VAE)
frozen and held in bf16, with no gradients and no optimizer state. The 16 rows go through gradient
accumulation: on one chip 16 microbatches of one 1024^2 image each (the mesh puts every device on
`fsdp`, so a v6e-8 host runs the same config with the frozen base sharded 8 ways and 2 microbatches
per chip). On an 80 GB-class chip (the default) remat keeps every projection's output
(`dots_with_no_batch_dims_saveable`), so the backward pass recomputes no projection, only norms,
activations and the attention; `:v6e` (32 GB chips) saves nothing but each layer's input, which a
v6e-8 host needs (the projections' outputs of one 1024^2 image take ~20 GiB).

The train stage saves the adapters and their optimizer state only, and writes an adapters-only
model dir over the base (`srum_jax/convert/checkpoint.py`) that every stage and `export --adapters
merge|separate` read. The learning rate is the full fine-tuning recipe's (2e-5); LoRA is usually
trained with a larger one. In the shapes world, rank-8 LoRA at 10x full SRUM's learning rate ended
1.6 +- 1.9 points below full SRUM (benchmarks/results_lora_shapes.txt, one setting, not tuned); the
7B learning rate is not measured.
"""
from srum_jax import defaults
from srum_jax.data.prompt_sources import prompt_source


def get_config(arg=None):
  """arg: None (one 80 GB-class chip: v5p, H100) or "v6e" (32 GB chips: the less memory-hungry
  remat)."""
  if arg not in (None, "", "v6e"):
    raise ValueError(f"bagel_7b_lora.py takes no argument or ':v6e', not {arg!r}")
  c = defaults.base_config()
  c.workdir = "outputs/bagel_7b_lora"
  c.model.preset = "bagel_7b_mot"
  c.model.param_dtype = "bfloat16"  # the frozen base
  c.model.inference_dtype = "bfloat16"
  c.model.compute_dtype = "bfloat16"
  c.model.attn_impl = "auto"
  c.model.remat = True
  c.model.remat_policy = "" if arg == "v6e" else "dots_with_no_batch_dims_saveable"
  c.model.lora.rank = 32
  c.model.lora.alpha = 32.0
  c.model.lora.dtype = "float32"  # the adapters' master weights
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.inference_mesh.data, c.inference_mesh.fsdp, c.inference_mesh.tensor = 1, -1, 1
  c.prompts.train = prompt_source(source="file", path="SRUM/train_comp.json")
  c.prompts.val = prompt_source(source="file", path="SRUM/val_comp.json")
  c.train.batch_size = 16  # rows of one 1024^2 image: the official 16 images per update
  c.train.samples_per_row = 1
  c.train.num_tokens = 4096 + 256  # 64x64 latent tokens + the text slots
  c.train.text_capacity = 256
  c.train.microbatch_rows = 1  # one image per forward/backward; the rest is accumulation
  c.train.save_every = 308
  return c
