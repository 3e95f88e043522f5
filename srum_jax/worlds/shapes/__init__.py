"""The shapes world: scenes and renderer (`scene`), prompt grammar, splits, scenes for prompts and
hard negatives (`grammar`), and the pixel-reading judge (`oracle`, independent of the other two)."""
from srum_jax.worlds.shapes import grammar, oracle, scene
from srum_jax.worlds.shapes.grammar import (
    CATEGORIES, DEFAULT_LAYOUT, LAYOUT_3X3, NEGATIVE_KINDS, VOCAB, Group, Layout, Prompt, Spec,
    all_prompts, describe, hard_negative, negative_kinds, parse_prompt, prompt_index, realize,
    sample_prompt, sample_scene, split_prompts, tokenize)
from srum_jax.worlds.shapes.oracle import detect, evaluate, judge
from srum_jax.worlds.shapes.scene import (
    PALETTE, Obj, Scene, object_box, object_mask, palette, render, scene_boxes, scene_masks)


def judge_text(image, text: str) -> bool:
  """The oracle on a prompt given as text (parsed back to its spec with the grammar): the `eval`
  judge."""
  return bool(judge(image, parse_prompt(text), value_range=(0, 255)))
