"""Optimizer and learning-rate schedule shared by every trainer (SRUM post-training, tiny-world pretraining).

    labels = param_labels(params, freeze=("vit", "connector", "ae"))   # adapters_only=True: LoRA training
    tx = make_optimizer(config.train, labels, total_steps=config.train.steps)
    state = update.init_state(params, tx, labels=labels)   # gradients and EMA for the trainable leaves only
    lr = lr_schedule(config.train, total_steps)(step)        # what the optimizer applies at update `step`

The schedule is a function of the update count only (never of wall-clock time), so a run's numbers do
not depend on the machine's speed. An optimizer config block declares: lr, lr_decay ("constant" |
"cosine"), min_lr_ratio, warmup_steps, b1, b2, eps, weight_decay, grad_clip.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import optax

from srum_jax.models.params import is_adapter_path

__all__ = ["LR_DECAYS", "FREEZE_GROUPS", "lr_schedule", "make_optimizer", "param_labels"]

LR_DECAYS = ("constant", "cosine")
# What `freeze` may name: the top-level BAGEL groups, the autoencoder, the understanding expert.
FREEZE_GROUPS = ("vit", "connector", "llm", "vae2llm", "llm2vae", "time_embedder", "ae", "und")


def lr_schedule(ocfg, total_steps: Optional[int] = None) -> optax.Schedule:
  """Linear warm-up from 0 to `lr` over `warmup_steps` updates, then constant, or a cosine decay that
  reaches `min_lr_ratio * lr` at `total_steps` (and stays there)."""
  peak, warm = float(ocfg.lr), max(int(ocfg.warmup_steps), 1)
  if ocfg.lr_decay == "constant":
    after = optax.constant_schedule(peak)
  elif ocfg.lr_decay == "cosine":
    if total_steps is None:
      raise ValueError("a cosine learning-rate decay needs total_steps")
    after = optax.cosine_decay_schedule(peak, max(int(total_steps) - warm, 1), alpha=float(ocfg.min_lr_ratio))
  else:
    raise ValueError(f"lr_decay={ocfg.lr_decay!r}; choose one of {LR_DECAYS}")
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def param_labels(params, freeze: Sequence[str], *, adapters_only: bool = False) -> Any:
  """'train' / 'frozen' per leaf of a {'bagel': ..., 'ae': ...} tree.

  `freeze` names top-level BAGEL groups ('vit', 'connector', 'llm', ...), 'ae', or 'und' (the understanding
  expert: llm.layers.und and llm.norm; the shared embeddings stay trainable). `adapters_only` (LoRA
  training): every leaf but the LoRA adapters is frozen, whatever `freeze` says.
  """
  freeze = set(freeze)

  def label(path, _):
    if adapters_only:
      return "train" if is_adapter_path(path) else "frozen"
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if keys[0] == "ae":
      return "frozen" if "ae" in freeze else "train"
    sub = keys[1:]
    if sub and sub[0] in freeze:
      return "frozen"
    if "und" in freeze and (sub[:3] == ["llm", "layers", "und"] or sub[:2] == ["llm", "norm"]):
      return "frozen"
    return "train"

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(ocfg, labels=None, *, total_steps: Optional[int] = None) -> optax.GradientTransformation:
  """Global-norm clip over the trainable leaves, then AdamW on `lr_schedule`; leaves labelled 'frozen' are
  zeroed and keep no optimizer state (`labels`: None = everything trains)."""
  train = optax.chain(optax.clip_by_global_norm(float(ocfg.grad_clip)),
                      optax.adamw(lr_schedule(ocfg, total_steps), b1=float(ocfg.b1), b2=float(ocfg.b2),
                                  eps=float(ocfg.eps), weight_decay=float(ocfg.weight_decay)))
  if labels is None:
    return train
  return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)
