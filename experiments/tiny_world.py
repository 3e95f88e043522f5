"""The shapes world end to end: run SRUM on the shipped tiny BAGEL, or pretrain one from scratch.

    # SRUM on the shipped model (2 CPU cores, ~4 min)
    python -m srum_jax run --config=experiments/tiny_world.py
    # the same recipe scaled down (1 candidate per train prompt, 300 steps; ~2 min)
    python -m srum_jax run --config=experiments/tiny_world.py:quick
    # stages A, B, C, D; CPU (2 cores)
    python -m srum_jax pretrain --config=experiments/tiny_world.py
    # stages C and D, from B's model
    python -m srum_jax pretrain --config=experiments/tiny_world.py:position
    # stage D alone, from C's model
    python -m srum_jax pretrain --config=experiments/tiny_world.py:think
    # one GPU: same steps, larger batches
    python -m srum_jax pretrain --config=experiments/tiny_world.py:gpu
    # SRUM on your own model
    python -m srum_jax run --config=experiments/tiny_world.py \
        --config.model.official_dir=outputs/tiny_world_pretrain/position/official

`model.official_dir` is the checkpoint shipped in the repo (`srum_jax/worlds/shapes/checkpoint`:
official BAGEL safetensors + json, converted into `<workdir>/converted_model` by the converter at
start). `pretrain.*` drives `srum_jax.pretrain`, which writes `<pretrain.out>/model` (orbax) and
`<pretrain.out>/official` (the shipped layout) for stages A+B, then runs `pretrain.then` (stage C)
as a warm start from that model into `<pretrain.out>/position/{model,official}` and its `then`
(stage D, think mode) into `<pretrain.out>/position/think/{model,official}` (the shipped checkpoint
has this layout; it came from a longer schedule). Everything else is the SRUM loop at the tiny
model's size (32x32 images; candidates drawn in think mode, the model writing a layout plan first,
as the paper draws them; components proposer, logits-mode self-judge on the 28x28 view that names
each boxed object before scoring it; plain-prompt oracle eval on the val prompts). Measured figures:
`benchmarks/results_tiny_world_effect_cpu.txt`.
"""
import pathlib

import ml_collections

import srum_jax
from srum_jax import defaults
from srum_jax.data.prompt_sources import prompt_source

SHIPPED = str(pathlib.Path(srum_jax.__file__).parent / "worlds" / "shapes" / "checkpoint")

SHAPES = "srum_jax.worlds.shapes.sources:prompts"


def pretrain_config(gpu: bool) -> ml_collections.ConfigDict:
  """Stages A+B. The schedules follow the step counts, sized so that the chain A-D takes < 2 h on 2
  CPU cores (`benchmarks/results_pretrain_cpu.txt`); `max_seconds` only caps a slow machine."""
  p = defaults.pretrain_stage()
  p.out = "outputs/tiny_world_pretrain"
  if gpu:
    p.compute_dtype = "bfloat16"
    p.data_workers = 12
    p.snapshot_every_seconds = 0.0
    p.ae.batch = 128
    p.umm.und_rows = 192
    p.umm.gen_rows = 8
    p.eval.batch_size = 64
  return p


def position_stage(p: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Stage C, warm-started from stage B's model: teach the judge *where* (left/right, which object
  is in a box).

  BAGEL gives all ViT tokens of an image one RoPE position, so "where" reaches the LLM only through
  position embeddings, and stage B's learned ViT table stays ~1% of the patch content: the judge
  reads the image as a bag. Here the ViT table is redrawn at std 4 (the patch content's scale) and a
  curriculum teaches reading it: grounding first ("<locate> red circle" -> box), then relation
  judgements, then box -> object lookups (region scores), then the whole mix with grounding kept.
  """
  p.name = "position"  # as `pretrain.then`: written to <out of the stage before>/<name>
  p.out = "outputs/tiny_world_pretrain/position"
  # stage B's model (`pretrain.out` of the default config)
  p.init_from = "outputs/tiny_world_pretrain/model"
  p.umm.vit_pos_init_std = 4.0
  p.umm.lr = 5e-4
  p.umm.min_lr_ratio = 0.2
  p.umm.warmup_steps = 100
  # stage B's mix + grounding
  p.data.tasks = ml_collections.ConfigDict(dict(p.data.tasks.to_dict(), locate=0.1))
  region_kinds = {"color": 2.0, "shape": 2.0, "count": 1.0, "relation": 1.5, "roles": 1.0}
  p.phases = (
      # read the ViT position table: where is the named object
      dict(steps=2000, tasks={"locate": 1.0}),
      dict(
          steps=1500, relations_only=True, tasks={
              "global": 0.5,
              "region1": 0.3,
              "locate": 0.2
          }, negatives=0.5, negative_kind_weights={
              "color": 0.2,
              "shape": 0.2,
              "count": 0.2,
              "relation": 3.0,
              "roles": 0.5
          }),
      dict(steps=1500, tasks={
          "global": 0.15,
          "region1": 0.45,
          "regions": 0.3,
          "locate": 0.1
      }, negatives=0.5, distractors=0.15,
           negative_kind_weights=region_kinds),  # which object is in this box
      dict(steps=2000, tasks={
          "global": 0.1,
          "region1": 0.4,
          "regions": 0.4,
          "locate": 0.1
      }, negatives=0.5, distractors=0.25, negative_kind_weights=dict(region_kinds, color=3.0)),
  )
  p.umm.steps = 8000  # the phases (7000 steps), then the mix
  p.max_seconds = 2100.0
  p.snapshot_every_seconds = min(p.snapshot_every_seconds, 600.0)
  return p


def think_stage(p: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Stage D, warm-started from stage C's model: think mode, as BAGEL generates SRUM's candidates.

  The model learns to write a layout plan for a prompt (`grammar.plan_text`: what goes in each cell
  of the 2x2 lattice, learned from scene ground truth; the `plan` task, asked after the generation
  think system prompt) and to draw from prompt + plan (a share `data.think` of the generation
  samples). Plain-prompt generation keeps training on the rest, and the judge on stage C's mix. The
  shipped checkpoint got its stage D as two runs of this stage (3693 steps with half the generation
  rows, then 4000 steps with these settings; its `pretrain_summary.json` has the commands), before
  the chain's schedule was cut to fit 2 h.
  """
  p.name = "think"
  p.out = "outputs/tiny_world_pretrain/position/think"
  p.init_from = "outputs/tiny_world_pretrain/position/model"  # stage C's model
  p.umm.lr = 3e-4
  p.umm.min_lr_ratio = 0.2
  p.umm.warmup_steps = 100
  # generation learns a new condition: four times stage B/C's share; the judge keeps
  p.umm.gen_rows *= 4
  # stage C's rows (`umm.und_rows`): plans are learned in them (half as many: weaker plans)
  # [system prompt] + [the longest prompt] + [plan: 8 words], each BOS/EOS-wrapped
  p.umm.gen_text_len = 3 + 13 + 10
  # C's mix + plans
  p.data.tasks = ml_collections.ConfigDict(dict(p.data.tasks.to_dict(), locate=0.1, plan=0.3))
  p.data.think = 0.75
  p.umm.steps = 6000
  p.max_seconds = 1900.0
  p.snapshot_every_seconds = min(p.snapshot_every_seconds, 600.0)
  p.eval.think = True
  return p


def get_config(arg=None):
  """arg: "cpu" (default) or "gpu", optionally ",position" (stages C and D, from B's model) or
  ",think" (stage D alone, from C's model), e.g. "gpu,position"; and optionally ",quick": SRUM on
  one think-mode candidate per train prompt for 300 steps instead of the recipe's two for 1600 (a
  shorter demo; its gain is smaller)."""
  parts = [a for a in (arg or "").split(",") if a]
  known = {"cpu", "gpu", "position", "think", "quick"}
  if set(parts) - known or {"cpu", "gpu"} <= set(parts) or {"position", "think"} <= set(parts):
    raise ValueError(
        f"unknown config arg {arg!r}; use 'cpu' (default) or 'gpu', optionally ',position' or "
        "',think', and ',quick'")
  gpu = "gpu" in parts
  c = defaults.base_config()
  quick = "quick" in parts
  c.workdir = "outputs/tiny_world_quick" if quick else "outputs/tiny_world"
  c.texts.file = "own"  # the model was trained on the own texts (its tokenizer reads their pieces)
  empty = defaults.base_config().pretrain.then
  if "think" in parts:  # stage D alone, from an existing stage-C model (`pretrain.init_from`)
    c.pretrain = think_stage(pretrain_config(gpu))
    c.pretrain.then = empty
  # stage C, then D, from an existing stage-B model (`pretrain.init_from`)
  elif "position" in parts:
    c.pretrain = position_stage(pretrain_config(gpu))
    c.pretrain.then = think_stage(pretrain_config(gpu))
    c.pretrain.then.out = c.pretrain.then.init_from = ""
    c.pretrain.then.then = empty.then
  else:  # one command, A+B, C, D: each starts from the model before it and writes under its out
    c.pretrain = pretrain_config(gpu)
    c.pretrain.then = position_stage(pretrain_config(gpu))
    c.pretrain.then.out = c.pretrain.then.init_from = ""  # "": derived from `pretrain.out`
    c.pretrain.then.then = think_stage(pretrain_config(gpu))
    c.pretrain.then.then.out = c.pretrain.then.then.init_from = ""
  c.model.official_dir = SHIPPED
  c.model.preset = "tiny_world"
  c.model.compute_dtype = "float32"
  c.model.param_dtype = "float32"
  # Recomputing each layer in the backward: on CPU the step is faster than storing the scanned
  # layers' activations (same losses; benchmarks/results_benchmarks_cpu.txt, issue 31)
  c.model.remat = True
  # Candidates for every train prompt (1277): SRUM's gain on held-out prompts grows with the number
  # of distinct prompts its candidates cover, far more than with candidates per prompt or their
  # correctness (benchmarks/results_tiny_world_think_cpu.txt).
  c.prompts.train = prompt_source(source="python", function=SHAPES,
                                  kwargs={"split": "train", "per_category": 0})
  c.prompts.val = prompt_source(source="python", function=SHAPES,  # all
                                kwargs={"split": "val", "per_category": 0})
  # The generalisation split (worlds/shapes/generalisation.py): 400 prompts in forms neither train
  # nor val holds, evaluated beside val, never trained on.
  c.prompts.eval_extra.gen = prompt_source(source="python", function=SHAPES,
                                           kwargs={"split": "gen", "per_category": 0})
  # The anchor's prompts (read when srum.anchor_weight > 0): the train prompts' parts recombined,
  # every train and val text and every gen combination excluded (worlds/shapes/anchors.py).
  c.prompts.anchor = prompt_source(source="python", function=SHAPES,
                                   kwargs={"split": "anchor", "per_category": 0})
  for g in (c.generate, c.eval_generate, c.sample):
    g.batch_size = 32
    g.height = g.width = 32
    g.num_timesteps = 16
    g.timestep_shift = 1.0
    g.cfg_text_scale = 3.0
    g.cfg_interval = (0.0, 1.0)
    g.think = False
    g.max_think_tokens = 9  # a plan: 8 words + EOS
    g.crop_to_content = False  # scenes fill the canvas (a black background is part of the picture)
  # SRUM's candidates come from think mode (the paper's recipe); eval: the plain prompt
  c.generate.think = True
  # `sample`, `edit`, `ask` on the shipped model: 32x32 images, a 28x28 ViT view, the world's
  # sampler
  c.sample.batch_size = 8
  c.edit.update(dict(vae_transform=(32, 32, 16), vit_transform=(28, 28, 14), num_timesteps=16,
                     timestep_shift=1.0, cfg_text_scale=3.0, cfg_img_scale=1.5, max_think_tokens=9))
  c.ask.update(dict(vae_transform=(32, 32, 16), vit_transform=(28, 28, 14), max_new_tokens=48))
  c.generate.samples_per_prompt = 1 if quick else 2
  # 4 x 295 val images per model: halves the eval noise (one image: ~3 pts)
  c.eval_generate.samples_per_prompt = 4
  c.propose.name = "components"
  c.propose.max_regions = 5
  c.propose.min_area = 12  # pixels: the oracle's speckle threshold at 32x32
  c.propose.options = {}
  c.score.mode = "logits"
  # Regions: the model names the boxed object, then scores it (the official answer order): a
  # one-step "Score:" answer misses boxes on the wrong object of a hard negative (multi-object
  # colour / shape).
  c.score.region_identify = True
  c.score.think = False
  c.score.batch_size = 32
  c.score.max_retries = 1
  c.score.max_new_tokens_global = 8
  c.score.max_new_tokens_regions = 64
  # 2x2 ViT patches, one per 16-px cell (pretraining's judge data uses this view)
  c.score.vit_image_size = 28
  c.eval.judge = "oracle"
  c.eval.oracle_fn = "srum_jax.worlds.shapes:judge_text"
  # In this world fine-tuning on its own samples drifts the generator (SFT, R == 1, ends below
  # base), and the constraint term is that same SFT loss on every candidate, so lambda = 0 here
  # (lambda 0.5 loses on val and on the generalisation split: results_generalisation.txt); training
  # at high noise (timestep_shift 4: where layout and binding are decided, not the soft texture of
  # self-samples) drifts less. 1600 steps on two candidates per train prompt gain on val and on
  # the generalisation split over 3 seeds; `:quick` trains 300 on one.
  c.srum.lambda_constraint = 0.0
  c.train.steps = 300 if quick else 1600
  c.train.warmup_steps = 10
  c.train.lr = 1e-4
  c.train.batch_size = 8
  c.train.samples_per_row = 4
  c.train.image_resize = "fixed"  # the world's one image size
  c.train.image_hw = (32, 32)
  c.train.max_regions = 5  # what the proposer gives
  c.train.text_capacity = 4 * 15  # per sample: BOS + <= 11 words + EOS + 2 image markers
  c.train.num_tokens = 4 * 31  # + 16 latent tokens
  c.train.timestep_shift = 4.0
  c.train.save_every = 1000
  c.train.data_threads = 2
  c.run.sft_control = True
  return c
