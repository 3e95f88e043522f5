"""Checkpoint conversion between the official BAGEL files and the srum_jax parameter tree
(docs/bagel.md, "Checkpoint layout").

  keymap       official key <-> tree path table, derived from the parameter schema
  hf_to_flax   official dir -> model dir (streamed onto shardings); `python -m srum_jax convert`
  flax_to_hf   model dir -> official files; `python -m srum_jax export`
  checkpoint   model dir = orbax params + model_config.json (`save_model_dir`, `load_model_dir`)
  adapters     LoRA adapters apart from their base, in PEFT's files (`read_adapters`, `load_with_adapters`)
"""
from srum_jax.convert.checkpoint import (config_from_dict, config_to_dict, load_model_dir,  # noqa: F401
                                         save_model_dir, target_shardings)
from srum_jax.convert.keymap import expected_official_shapes, official_keys  # noqa: F401
