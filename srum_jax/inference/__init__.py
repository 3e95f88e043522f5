"""Inference: KV-cache contexts and prefill, text decoding, flow sampling with CFG
(docs/bagel.md)."""
from srum_jax.inference.context import (Context, add_texts, add_vit_images, concat_contexts,
                                        init_context, pad_ids, prefill_text, prefill_vae_image,
                                        prefill_vit_image, vae_inputs, vit_inputs, wrap_text)
from srum_jax.inference.decoding import (Generation, answer, answer_text, generate_text,
                                         generated_ids, strip_think)
from srum_jax.inference.sampling import (T2IResult, branch_velocities, cfg_combine, decode_latents,
                                         initial_noise, prompt_keys, sample_images, sample_latents,
                                         shifted_timesteps, text_to_image, velocity)
