"""Pretraining a tiny BAGEL from scratch on the shapes world: a UMM that judges well and generates
imperfectly.

    python -m srum_jax pretrain --config=experiments/tiny_world.py[:gpu]

Same model code as the 7B (`models/*`, preset `tiny_world`) and the same training core as SRUM
post-training (`srum_jax.training`). Stage A trains the FLUX autoencoder to reconstruct rendered
scenes (L1 + L2 + a small KL), then freezes it and fits `shift_factor` / `scale_factor`
(unit-variance latents). Stage B trains the UMM with one jitted step over two batches: T2I flow
matching on (train prompt, rendered scene) pairs with the SRUM step's plain flow loss, and
next-token cross-entropy on judge answers labelled from scene ground truth (`batches`). Generation
is kept imperfect only by budget: its batch is small next to the understanding batch.
`pretrain.then` (and its own `then`) chain warm-started stages: the shapes world's stage C
(positions) and stage D (think mode: the model writes a layout plan,
`worlds.shapes.grammar.plan_text`, and draws from prompt + plan).

Modules: `vocab` (word-level tokenizer, answer text), `batches` (examples, batches, curriculum,
workers), `steps` (losses and steps), `init` (initialisations), `stages` (start modes, stages, the
chain, CLI), `heldout` (held-out metrics).
"""
from srum_jax.pretrain.heldout import EvalSettings, evaluate_model
from srum_jax.pretrain.stages import (StartMode, main, next_stage, pretrain_chain, run_stage,
                                      start_mode)

__all__ = [
    "EvalSettings", "evaluate_model", "StartMode", "main", "next_stage", "pretrain_chain",
    "run_stage", "start_mode"
]
