"""The base experiment config every `experiments/*.py` file starts from (big_vision `get_config`
style).

Every key any stage reads is declared here, so an override of a key that does not exist fails before
any work starts, and code reads keys directly (no fallback values in code). Keys are grouped by
pipeline stage; values are the official SRUM / BAGEL recipe unless a comment says otherwise, so the
paper's recipe is stated here once and an experiment changes only what differs (model size,
sharding, resolution). Where SRUM's scripts and the functions they call disagree, the value is the
one the shipped path runs with: its shell scripts' arguments, then the launcher's defaults (e.g.
`srum_data_infer/vlm.sh` runs `vlm_multi_gpu.py`, whose argument defaults override `vlm.py`'s own).
"""
from __future__ import annotations

import ml_collections

from srum_jax.data.prompt_sources import prompt_source


def optimizer_block(**values) -> ml_collections.ConfigDict:
  """The keys `training.optimizer.make_optimizer` reads (defaults: SRUM post-training: AdamW lr
  2e-5, betas
  0.9/0.95, eps 1e-15, no weight decay, 100 warm-up updates then constant, clip 1.0)."""
  block = ml_collections.ConfigDict(
      dict(lr=2e-5, lr_decay="constant", min_lr_ratio=0.0, warmup_steps=100, b1=0.9, b2=0.95,
           eps=1e-15, weight_decay=0.0, grad_clip=1.0))
  block.update(values)
  return block


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 42
  c.workdir = "outputs/run"
  # A workdir's outputs record what made them (model identity, seed, the stage's settings, its
  # inputs): a command whose configuration would make different outputs stops (exit 2) naming what
  # differs. True: those stale outputs (and what was made from them) are deleted and made again.
  c.discard_stale = False

  # Model: a converted model directory (orbax + model_config.json + tokenizer.json), or an official
  # checkpoint
  # directory (safetensors + json) that is converted into <workdir>/converted_model on first use.
  c.model = ml_collections.ConfigDict()
  c.model.dir = ""  # `python -m srum_jax convert` output (required unless official_dir is set)
  c.model.official_dir = ""  # used instead of `dir` when set
  c.model.preset = "tiny"  # tiny | tiny_world | mid | bagel_7b_mot (benchmarks and tests build random models)
  c.model.param_dtype = "float32"  # training's master weights: float32 | bfloat16
  c.model.inference_dtype = ""  # parameters for generate / score / eval ("": param_dtype)
  c.model.compute_dtype = "bfloat16"
  # auto (by platform: tpu -> splash, gpu -> tokamax if installed else cudnn, cpu -> xla) | xla | dense | chunked
  # | splash | cudnn | tokamax (srum_jax/models/attention.py); every stage resolves it the same way.
  c.model.attn_impl = "auto"
  c.model.remat = False
  c.model.remat_policy = ""  # with remat: "" saves nothing, else a jax.checkpoint_policies name
  # LoRA (rank 0: off): adapters on the MoT experts' projections; only they train, the base is
  # frozen (held in model.param_dtype) and the adapters' master weights are in model.lora.dtype
  # (srum_jax/models/lora.py).
  c.model.lora = ml_collections.ConfigDict(
      dict(rank=0, alpha=16.0, dropout=0.0, dtype="float32",
           targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
           experts=("gen",)))

  # The texts sent to the model and the metric judges (think system prompts, SRUM's judge questions,
  # the evaluation rubrics; srum_jax/rewards/texts.py). file: "" or "own" -> the project's own
  # wording (the shapes world's model was trained on it); a path -> the official texts, read from
  # your BAGEL / SRUM / T2I-ReasonBench checkouts by `python -m srum_jax texts import` (README,
  # "Official texts"). require_official: "" is an error that stops before any work and says how to
  # import them; "own" must be chosen explicitly.
  c.texts = ml_collections.ConfigDict()
  c.texts.file = ""
  c.texts.require_official = False

  # Device meshes and logical-axis rule overrides ([[logical, mesh_axes], ...] on top of
  # DEFAULT_RULES).
  # Training runs on every device of every process; inference (generate, score, eval) on each
  # process's own
  # devices, parameters sharded by the same rules (fsdp / tensor), batch rows over data x fsdp.
  # One size may be -1 (the remaining devices); mesh.tensor 0: derived so the batch rows split
  # evenly.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.inference_mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.sharding_rules = []

  # SRUM objective: L = mean(R (v - (eps - x_bad))^2) + lambda * mean((v - (eps - x_gt))^2).
  c.srum = ml_collections.ConfigDict()
  c.srum.lambda_constraint = 0.5
  c.srum.signed_rewards = False
  c.srum.use_local = True  # region rewards
  c.srum.use_global = True  # global layout reward
  # SRUM's vlm_format_output.py `parse_and_convert_record`: records whose global score is 0.0 are
  # dropped
  c.srum.drop_zero_global = True
  # Not in the official recipe: + anchor_weight * mean((v - v_ref)^2) at the batch's noised latents
  # under prompts from `prompts.anchor` (outside the candidate set), v_ref the frozen starting
  # model's velocity (0: off).
  c.srum.anchor_weight = 0.0

  # Post-training (SRUM's scripts/train_reg_comp.sh).
  c.train = optimizer_block()
  c.train.objective = "srum"  # srum | sft (R == 1 and lambda = 0: plain flow matching on the same data)
  c.train.steps = 309
  c.train.timestep_shift = 1.0
  c.train.text_cond_dropout = 0.1
  # global rows per update (samples_per_row images each), whatever the device count
  c.train.batch_size = 2
  # rows per batch shard per forward/backward; fewer than a shard's: accumulation
  c.train.microbatch_rows = 0
  # 0: no EMA (official SRUM); > 0: `run` continues with the EMA of the weights
  c.train.ema_decay = 0.0
  c.train.freeze = ("vit", "connector", "ae")  # top-level parameter groups held fixed
  # XLA TPU's windowed einsum for the step's FSDP matmuls (False: whole all-gathers and
  # reduce-scatters; fewer bytes by XLA's cost model, benchmarks/results_tpu_cost.txt)
  c.train.tpu_collective_matmul = True
  c.train.save_every = 100
  c.train.keep_checkpoints = 2
  c.train.log_every = 10
  c.train.sample_every = 100  # PNG grid of training images with reward overlays (0: never)
  c.train.sample_posterior = True  # VAE posterior sample (official) vs. its mean
  # cached: the frozen VAE encodes each round's images once (data preparation)
  c.train.vae_moments = "cached"
  #   and the step samples from the stored posterior moments | step: the encoder runs inside every step
  c.train.moments_dtype = "float32"  # stored moments: float32 (the step's loss unchanged) | bfloat16 (half size)
  # images per jitted encoder call of the moments pass (rounded up to the device count)
  c.train.encode_batch = 8
  # Data: reward records (records.py schema) with image paths relative to images_root; "" ->
  # records's folder.
  # `train.records`: a JSONL of this project's schema or SRUM's formatted one
  # (`vlm_format_output.py`),
  # or a folder holding one (SRUM's released CompBench training set as downloaded):
  # `record_sources.py`.
  c.train.records = ""  # "" -> <workdir>/score/rewards.jsonl (the score stage's output)
  c.train.records_format = "auto"  # auto (from the file's first record) | srum_jax | official
  # "": the score stage's images, or found beside the records (SRUM's layout)
  c.train.images_root = ""
  # Training images (SRUM's `scripts/data/rft_comp.yaml` image_transform_args ->
  # `data/transforms.py` `ImageTransform`): `official` resizes each image keeping its aspect (long
  # side <= max, short side >= min, sides multiples of the stride) and pads it to the static canvas
  # `image_hw` (padded latent tokens stay out of the packed rows and the loss); `fixed` resizes
  # every image to `image_hw`. Boxes follow each image's scaling.
  c.train.image_resize = "official"  # official | fixed
  c.train.official_resize = (1024, 512, 256)  # (max_image_size, min_image_size, image_stride)
  c.train.image_hw = (1024, 1024)  # the static canvas (H, W): holds the largest `official` image
  c.train.samples_per_row = 2  # T2I samples packed per row (official: ~2 per GPU at 8192 tokens)
  c.train.num_tokens = 8448  # static row budget: samples_per_row * (h*w latents) + text_capacity
  # static text slots per row (BOS/EOS, prompt ids and the image markers)
  c.train.text_capacity = 256
  c.train.max_regions = 10  # regions per image: what scoring writes (propose.max_regions)
  c.train.data_threads = 4
  c.train.data_workers = 0  # >0: grain decodes in that many processes

  # Prompt sets (srum_jax.data.prompt_sources.load_prompts): file / tfds / python sources.
  c.prompts = ml_collections.ConfigDict()
  c.prompts.train = prompt_source(source="tfds", name="t2i_compbench", split="train")
  c.prompts.val = prompt_source(source="tfds", name="t2i_compbench", split="val")
  # The anchor's prompts (`srum.anchor_weight` > 0): conditions on which training keeps the starting
  # model's velocity; read only when the anchor is on.
  c.prompts.anchor = prompt_source(source="tfds", name="t2i_compbench", split="train")
  # Further eval-only prompt sets, {name: prompt source}: `run` evaluates every model on each beside
  # val (<workdir>/eval_<name>/; e.g. the shapes world's generalisation split). None by default.
  c.prompts.eval_extra = ml_collections.ConfigDict()

  # Candidate generation: SRUM's srum_data_infer/t2i.py `main` as compt2i.sh runs it (think mode, 50
  # steps,
  # text cfg 4.0 in (0.4, 1], image cfg 1.0, shift 3.0, global renorm; 1024^2: the inferencer's
  # image_shapes).
  c.generate = ml_collections.ConfigDict()
  c.generate.batch_size = 4
  c.generate.samples_per_prompt = 1
  c.generate.height = 1024
  c.generate.width = 1024
  c.generate.num_timesteps = 50
  c.generate.timestep_shift = 3.0
  c.generate.cfg_text_scale = 4.0
  c.generate.cfg_img_scale = 1.0
  c.generate.cfg_interval = (0.4, 1.0)
  c.generate.cfg_renorm_type = "global"
  c.generate.cfg_renorm_min = 0.0
  c.generate.think = True
  c.generate.max_think_tokens = 1000
  c.generate.crop_to_content = True  # save images cropped to their non-black box (SRUM's t2i.py)
  c.generate.text_budget = 0  # 0: bucket to the longest prompt
  # Prompts longer than this many token ids are skipped and counted (a batch pads to its longest
  # prompt, and
  # positions must stay below the LLM's max_position_embeddings); 0: that limit less the markers,
  # the plan (think mode) and the image's position.
  c.generate.max_prompt_tokens = 0

  # Region proposals (SRUM's vlm.sh: SAM ViT-H's automatic masks, the 10 largest:
  # `vlm_multi_gpu.py`'s --max_regions default, which overrides the 5 of `vlm.py`'s own parser).
  c.propose = ml_collections.ConfigDict()
  # sam (JAX, on inference_mesh) | sam_torch (PyTorch) | felzenszwalb | components | grid
  c.propose.name = "sam"
  c.propose.max_regions = 10
  c.propose.min_area = 0.0  # < 1: fraction of the image; >= 1: pixels
  c.propose.box_mode = "official"
  # images per proposer call (sam: one program over inference_mesh's data x fsdp)
  c.propose.batch_size = 8
  # Proposer keyword arguments; keys left "" are not passed. sam: weights = a released
  # sam_vit_*.pth, a transformers SamModel dir or a `convert-sam` dir; preset = vit_h | vit_l |
  # vit_b (checked against the weights); dtype = float32 | bfloat16. sam_torch: weights = a
  # transformers SamModel dir, device = cpu | cuda | ..., dtype. An experiment may add the
  # generator's thresholds (points_per_side, pred_iou_thresh, ...).
  c.propose.options = ml_collections.ConfigDict(
      {"weights": "", "preset": "", "device": "", "dtype": ""})

  # Self-judging (srum_data_infer/vlm.py's procedure; its prompts: the texts, `texts.file`).
  # Self-judging (SRUM's srum_data_infer/vlm.py `main`, as vlm.sh runs it through vlm_multi_gpu.py).
  c.score = ml_collections.ConfigDict()
  c.score.mode = "generate"  # generate (decode + parse) | logits (expected score token, one forward)
  c.score.think = True
  c.score.batch_size = 4
  # Unparsable answers are asked again: 5 attempts in all (`vlm_multi_gpu.py`'s --max_retries
  # default 5
  # counts attempts; `vlm.py`'s own parser says 3), every one greedy (`vlm.py` passes
  # text_temperature
  # 0.0 and the inferencer does not sample). Greedy re-asks repeat a deterministic model's answer; >
  # 0
  # samples them.
  c.score.max_retries = 4  # re-asks after the first answer
  c.score.retry_temperature = 0.0
  c.score.max_new_tokens_global = 1024
  c.score.max_new_tokens_regions = 4096
  c.score.global_default = 0.0  # vlm.py's value when every try fails (then removed by the filter)
  c.score.use_global = True
  c.score.use_regions = True
  c.score.logit_candidates = ("-1.0", "-0.5", "0.0", "0.5", "1.0")
  # logits mode, regions: name the boxed object first (greedy), then read the score after the name
  c.score.region_identify = False
  c.score.max_identify_tokens = 16
  c.score.text_budget = 0
  # 0: the official ViT transform; N (a multiple of 14): the judge sees images resized to N x N
  # (tiny worlds; pretraining's understanding data uses the same view)
  c.score.vit_image_size = 0

  # Evaluation (pipeline/evaluate.py, srum_jax/evaluation): held-out prompts, generation settings of
  # their own,
  # the metrics of `metrics`. Metric models are PyTorch (transformers) folders; nothing is
  # downloaded.
  c.eval = ml_collections.ConfigDict()
  c.eval.metrics = "judge"  # comma list of: judge, compbench, mllm, geneval, reasonbench
  # the UMM to evaluate: a converted or an official checkpoint dir ("" -> model.*)
  c.eval.model_dir = ""
  # score a folder of images made elsewhere instead of generating (evaluation/image_folders.py)
  c.eval.images_dir = ""
  # results in <workdir>/eval/<name>; <workdir>/eval/summary.md compares every name
  c.eval.name = "model"
  c.eval.batch_size = 16  # images per scoring call (and per resumable log flush)
  c.eval.grid_images = 8  # prompts in <out>/grid.png (0: no grid)
  c.eval.device = "auto"  # torch device of the metric models: auto (cuda if visible) | cpu | cuda | cuda:N
  c.eval.torch_dtype = "float32"  # BLIP / CLIP / detectors
  c.eval.judge = "self"  # oracle | self | hf_vlm
  c.eval.oracle_fn = ""  # "module:function(image uint8, prompt) -> bool" for judge=oracle
  c.eval.self_threshold = 0.0
  c.eval.hf_vlm_dir = ""
  c.eval.seed = 1234
  # T2I-CompBench's own metrics (evaluation/compbench.py), each category scored by its benchmark
  # metric.
  c.eval.compbench = ml_collections.ConfigDict()
  c.eval.compbench.blip_dir = ""  # BLIP VQA (the benchmark's: Salesforce/blip-vqa-capfilt-large)
  c.eval.compbench.clip_dir = ""  # CLIP ViT-B/32 (openai/clip-vit-base-patch32)
  c.eval.compbench.detector = "owlv2"  # owlv2 | owlvit | mask2former (UniDet is not in transformers)
  c.eval.compbench.detector_dir = ""  # e.g. google/owlv2-base-patch16-ensemble
  # OWLv2's confidence scale (UniDet used 0.5 on its own scale)
  c.eval.compbench.detector_threshold = 0.1
  c.eval.compbench.text_parser = "auto"  # auto | spacy | rules (how prompts are read: evaluation/text.py)
  c.eval.compbench.np_num = 8  # noun phrases asked per prompt (BLIP-VQA)
  # long side (px) of the detector frame the position thresholds assume
  c.eval.compbench.frame_size = 480
  c.eval.compbench.batch_size = 16  # BLIP questions per forward
  # The external MLLM judge, 0-100 per image (evaluation/mllm_judge.py; the paper:
  # Qwen2.5-VL-72B-Instruct); its question: the texts' `compbench_question` (official texts: SRUM's
  # CompBench_eval/qwen_eval.py).
  c.eval.mllm = ml_collections.ConfigDict()
  c.eval.mllm.model_dir = ""
  c.eval.mllm.torch_dtype = "bfloat16"
  c.eval.mllm.device_map = ""  # "": the model on eval.device; "auto": layers over all visible GPUs
  c.eval.mllm.batch_size = 4
  c.eval.mllm.max_new_tokens = 0  # 0: the benchmark script's (qwen_eval.py: 512; ReasonBench: 1000)
  c.eval.mllm.max_retries = 2  # answers without a score are asked again, sampling
  c.eval.mllm.retry_temperature = 0.7
  # GenEval (evaluation/geneval.py): its prompts and rules; defaults are GenEval's for Mask2Former
  # on COCO.
  c.eval.geneval = ml_collections.ConfigDict()
  c.eval.geneval.metadata = ""  # GenEval's evaluation_metadata.jsonl (also the prompts of the run)
  c.eval.geneval.detector = "mask2former"  # owlv2 | owlvit | mask2former
  c.eval.geneval.detector_dir = ""  # e.g. facebook/mask2former-swin-small-coco-instance
  c.eval.geneval.clip_dir = ""  # colour classifier: CLIP ViT-L/14 (openai/clip-vit-large-patch14)
  c.eval.geneval.threshold = 0.3
  c.eval.geneval.counting_threshold = 0.9
  c.eval.geneval.max_objects = 16
  c.eval.geneval.nms_threshold = 1.0  # 1.0: no NMS
  c.eval.geneval.position_threshold = 0.1
  # T2I-ReasonBench (evaluation/reasonbench.py) through the MLLM judge (eval.mllm.*), one dimension
  # a run; its questions are the texts' `reasonbench` protocol (texts import --reasonbench_code).
  c.eval.reasonbench = ml_collections.ConfigDict()
  # the benchmark's prompts/<dimension>.json (also the prompts of the run)
  c.eval.reasonbench.prompts = ""
  c.eval.reasonbench.questions = ""  # its deepseek_evaluation_qs/evaluation_<dimension>.json
  # "" -> from the file names (idiom, textual, entity, scientific)
  c.eval.reasonbench.dimension = ""
  # Held-out images as SRUM's CompBench_eval/comp_eval_infer.sh makes them: t2i_multi_gpu.py with
  # --think (the paper's 88.37 row), saved cropped as t2i.py does; think False is its "no think"
  # row.
  c.eval_generate = c.generate.copy_and_resolve_references()

  # ---- Inference commands `sample`, `edit`, `ask` (pipeline/inference_commands.py); BAGEL's
  # inferencer and app defaults. Outputs under `out` ("" -> <workdir>/<command>); `seeds` () ->
  # (seed,).
  c.sample = c.generate.copy_and_resolve_references()  # generate's keys (size, steps, CFG, think)
  # BAGEL's default; True: the model writes a plan first (kept beside the image)
  c.sample.think = False
  c.sample.prompts = ()  # e.g. --config.sample.prompts="('a red fox in the snow',)"
  c.sample.prompts_file = ""  # and/or a prompt file: txt, json or jsonl (`prompt_sources` formats)
  c.sample.seeds = ()
  c.sample.out = ""
  c.edit = ml_collections.ConfigDict()
  c.edit.image = ""  # the image to edit (its size after `vae_transform` is the output's)
  c.edit.prompt = ""  # the instruction
  # and/or JSONL lines {"image", "prompt", "id" (optional)}; paths relative to it
  c.edit.requests = ""
  c.edit.think = False
  c.edit.max_think_tokens = 1000
  c.edit.num_timesteps = 50
  c.edit.timestep_shift = 3.0
  c.edit.cfg_text_scale = 4.0  # BAGEL's editing recipe: text 4, image 2, whole flow, text_channel
  c.edit.cfg_img_scale = 2.0
  c.edit.cfg_interval = (0.0, 1.0)
  c.edit.cfg_renorm_type = "text_channel"
  c.edit.cfg_renorm_min = 0.0
  c.edit.vae_transform = (1024, 512, 16)  # (max side, min side, stride) of the input's resize
  c.edit.vit_transform = (980, 224, 14)  # the ViT's view of the resized input
  c.edit.sample_posterior = True  # the official encoder samples the VAE posterior; False: its mean
  c.edit.text_budget = 0  # 0: bucket to the longest instruction
  c.edit.batch_size = 1
  c.edit.seeds = ()
  c.edit.out = ""
  c.ask = ml_collections.ConfigDict()
  c.ask.image = ""
  c.ask.question = ""
  c.ask.requests = ""  # and/or JSONL lines {"image", "question", "id" (optional)}
  # True: the understanding think system prompt; `answer`: what follows </think>
  c.ask.think = False
  c.ask.max_new_tokens = 1000
  c.ask.do_sample = False  # BAGEL's default: greedy
  c.ask.temperature = 0.3  # with do_sample
  c.ask.vae_transform = (1024, 512, 16)  # the image is resized as for the VAE, then
  c.ask.vit_transform = (980, 224, 14)  # put through the ViT transform
  c.ask.text_budget = 0
  c.ask.batch_size = 1
  c.ask.out = ""
  # ---- end of the inference commands

  # The closed loop.
  c.run = ml_collections.ConfigDict()
  c.run.rounds = 1
  c.run.sft_control = False  # also train and evaluate the SFT control on round 0's candidates
  c.run.report_images = 8

  # Pretraining a tiny UMM from scratch on a synthetic world (`python -m srum_jax pretrain`).
  c.pretrain = pretrain_stage()
  # Up to two more stages in the same command, each warm-started from the one before (name "":
  # none).
  c.pretrain.then = pretrain_stage()
  c.pretrain.then.name = c.pretrain.then.out = ""
  c.pretrain.then.then = pretrain_stage()
  c.pretrain.then.then.name = c.pretrain.then.then.out = ""
  return c


def pretrain_stage() -> ml_collections.ConfigDict:
  """One pretraining stage: A (the autoencoder, unless reused) and B (the UMM), or a warm-started
  stage.

  Values are the shapes world's stage A+B on 2 CPU cores (`experiments/tiny_world.py` states them).
  """
  p = ml_collections.ConfigDict()
  p.name = "AB"  # "" as `then`: no next stage
  p.out = "outputs/pretrain"  # "" as `then`: <pretrain.out>/<then.name>
  # warm start from a model dir's params (its AE too); "" as `then`: <pretrain.out>/model
  p.init_from = ""
  # continue from <out>/state when it exists; a finished stage is kept by a rerun of a chain
  p.resume = True
  p.seed = 0
  p.preset = "tiny_world"
  p.max_seconds = 4000.0  # wall-clock cap of the stage (A + B), compilation included, eval excluded
  p.compute_dtype = "float32"
  p.eval_dtype = "float32"
  p.save_dtype = "float32"
  p.data_workers = 0  # spawned host-data processes
  p.log_every = 50  # host syncs: rarer is faster
  p.snapshot_every_seconds = 1200.0  # save <out>/state (resumable) + <out>/snapshot (0: never)
  # Stage A: the autoencoder (cosine schedule over its steps).
  p.ae = optimizer_block(lr=2e-3, lr_decay="cosine", min_lr_ratio=0.05, warmup_steps=50, b2=0.99,
                         eps=1e-8)
  p.ae.from_dir = ""  # reuse the AE (and its latent scale) of an existing model dir: skips stage A
  p.ae.steps = 1200
  p.ae.max_seconds = 540.0
  p.ae.batch = 32
  p.ae.kl_weight = 1e-4
  # oracle accuracy of reconstructions of val scenes (a report figure; 0: skip)
  p.ae.check_images = 128
  # Stage B: the UMM; one step = one generation batch + one understanding batch (cosine schedule).
  p.umm = optimizer_block(lr=1e-3, lr_decay="cosine", min_lr_ratio=0.05, warmup_steps=100, b2=0.98,
                          eps=1e-8, weight_decay=0.01)
  p.umm.steps = 14000
  p.umm.und_weight = 1.0
  # CE weight of the score-value tokens of the answers (the judgement itself)
  p.umm.score_weight = 3.0
  p.umm.number_init = True  # number words start from sin-cos features of their value
  p.umm.vit_pos_init_std = 0.0  # > 0: the ViT position embedding is redrawn at this std
  p.umm.und_rows = 8  # understanding rows per step, judge examples packed into them
  # row budget; an example is 4 ViT + 2 markers + question (<= 62) + answer (<= 47)
  p.umm.und_tokens = 128
  p.umm.und_samples_per_row = 3
  p.umm.logit_capacity = 64  # scored answer tokens per row
  p.umm.gen_rows = 1  # generation gets the smaller share: kept imperfect by budget
  p.umm.gen_samples_per_row = 4
  p.umm.gen_text_len = 13  # BOS + the longest prompt (11 words) + EOS
  p.umm.timestep_shift = 1.0
  p.umm.text_cond_dropout = 0.1
  # The understanding data mix (train prompts only).
  p.data = ml_collections.ConfigDict()
  p.data.tasks = ml_collections.ConfigDict({
      "global": 0.3,
      "region1": 0.3,
      "regions": 0.25,
      "describe": 0.15
  })
  p.data.negatives = 0.45  # hard negatives (one attribute changed), kinds drawn with these weights:
  p.data.negative_kind_weights = ml_collections.ConfigDict(
      {"color": 1.0, "shape": 2.0, "count": 1.0, "relation": 3.0, "roles": 2.0})
  p.data.easy_negatives = 0.05  # the scene of another prompt
  p.data.distractors = 0.05  # an extra object of a kind the prompt does not name (still true)
  p.data.background_box = 0.2
  p.data.box_jitter = 0.5
  p.data.blur = 0.3
  # one-box answers "Score: s" (logits mode) vs the full region block
  p.data.short_region_answer = 0.4
  # True: judge questions on prompts with a relation only (a curriculum phase)
  p.data.relations_only = False
  # generation samples in think mode: [think system prompt] [prompt] [layout plan] -> image
  p.data.think = 0.0
  # of those, the system prompt alone (think mode's classifier-free guidance)
  p.data.think_uncond = 0.1
  # Curriculum: phases of judge data before `data` (each: steps + the `data` keys it replaces).
  p.phases = ()
  # Evaluation on val prompts at the end (`pretrain.heldout.evaluate_model`).
  p.eval = ml_collections.ConfigDict()
  p.eval.enabled = True
  p.eval.seed = 0
  p.eval.num_pairs = 400
  p.eval.num_generate_mode = 32
  p.eval.num_locate = 0
  p.eval.num_gen_per_category = 0  # 0: every val prompt
  p.eval.gen_steps = 16
  p.eval.gen_cfg_scale = 3.0
  p.eval.gen_timestep_shift = 1.0
  p.eval.gen_cfg_interval = (0.0, 1.0)
  p.eval.batch_size = 32
  # also generate in think mode (plan validity, oracle accuracy of think-mode images)
  p.eval.think = False
  p.eval.max_think_tokens = 9  # the shapes world's plan: 8 words + EOS
  return p
