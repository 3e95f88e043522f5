"""The whole SRUM loop at toy size, for tests and smoke runs: a converted tiny BAGEL (`model.dir` is
required; tests build one from the golden tiny weights), shapes-world prompts, 32x32 images, 3 flow
steps, components proposer, oracle eval.

    python -m srum_jax run --config=experiments/tiny_pipeline.py \
        --config.model.dir=/path/to/tiny_model
"""
from srum_jax import defaults
from srum_jax.data.prompt_sources import prompt_source

SHAPES = "srum_jax.worlds.shapes.sources:prompts"


def get_config(arg=None):
  """arg: none (this config takes no argument)."""
  if arg:
    raise ValueError(f"unknown config arg {arg!r}; tiny_pipeline.py takes none")
  c = defaults.base_config()
  c.workdir = "outputs/tiny_pipeline"
  c.texts.file = "own"  # the shapes world's texts
  c.model.preset = "tiny"
  c.model.compute_dtype = "float32"
  c.model.param_dtype = "float32"
  c.prompts.train = prompt_source(source="python", function=SHAPES,
                                  kwargs={"split": "train", "per_category": 1})
  c.prompts.val = prompt_source(source="python", function=SHAPES,
                                kwargs={"split": "val", "per_category": 1})
  for g in (c.generate, c.eval_generate):
    g.batch_size = 8  # divides over the 8 simulated test devices (data-parallel sampling)
    g.height = g.width = 32
    g.num_timesteps = 3
    g.cfg_text_scale = 2.0
    g.think = False
    g.max_think_tokens = 8
    g.crop_to_content = False
  c.propose.name = "components"
  c.propose.max_regions = 5
  c.propose.options = {}
  c.score.think = False
  c.score.mode = "logits"  # always yields a score, also from an untrained judge
  c.score.batch_size = 4
  c.score.max_retries = 1
  c.score.max_new_tokens_global = 8
  c.score.max_new_tokens_regions = 16
  c.score.vit_image_size = 56
  c.eval.judge = "oracle"
  c.eval.oracle_fn = "srum_jax.worlds.shapes:judge_text"
  c.train.steps = 2
  c.train.warmup_steps = 1
  c.train.lr = 1e-4
  c.train.batch_size = 8  # rows; must divide over data x fsdp (8 simulated devices in tests)
  c.train.samples_per_row = 1
  c.train.image_resize = "fixed"
  c.train.image_hw = (32, 32)
  c.train.max_regions = 5
  c.train.text_capacity = 40
  c.train.num_tokens = 56
  c.train.save_every = 1000
  c.train.sample_every = 1
  c.train.log_every = 1
  c.train.timestep_shift = 2.0
  c.run.sft_control = True
  c.run.report_images = 5
  return c
