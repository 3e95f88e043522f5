"""Using a model directly, as BAGEL's inferencer offers it: `sample` (text -> image), `edit` (image
+ instruction -> image) and `ask` (image + question -> answer).

    python -m srum_jax sample --config=experiments/tiny_world.py \
        --config.sample.prompts="('a red circle',)"
    python -m srum_jax edit --config=... --config.edit.image=a.png --config.edit.prompt="paint it"
    python -m srum_jax ask --config=... --config.ask.image=a.png --config.ask.question="what is it?"

Each loads `model.*` on the inference mesh like the stages (`engine.loaded_model`) and writes under
its `out` folder (default `<workdir>/<command>`):

* sample: the generate stage itself (`pipeline.generate`) per seed: `seed_<s>/images/<file>.png`,
  `seed_<s>/metadata.jsonl` ({id, prompt, seed, image_file, think, ...}), and in think mode the plan
  beside each image (`<file>.txt`). Prompts: `sample.prompts` and/or `sample.prompts_file`.
* edit: `seed_<s>/images/<file>.png` (+ `.txt` plans) and `seed_<s>/metadata.jsonl` ({id, image,
  prompt, seed, image_file, think}); one image (`edit.image`, `edit.prompt`) and/or a JSONL of
  requests.
* ask: `answers.jsonl` ({id, image, question, answer, text}; `text` keeps the reasoning of think
  mode) and each answer printed.

Rows run in batches of `batch_size`, split over the inference mesh's batch axes, and are logged as
they finish: a rerun skips finished ids. `settings.json` in the out folder records what shapes the
outputs (every key but the inputs, `batch_size` and `seeds`, and the model); a rerun with other
settings stops with one line before any work. Ids: a prompt file's ids, else a hash of the text
(sample) or of image path and text (edit, ask); each image's noise is keyed by (seed, id), so it
does not depend on its batch. The think system prompts come from `think_system_prompts` (one place).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
from PIL import Image

from srum_jax import distributed, files, paths, progress
from srum_jax.data.prompt_sources import PromptItem, load_prompts, prompt_source, require_prompts
from srum_jax.engine import loaded_model
from srum_jax.errors import UserFileNotFoundError, UserValueError
from srum_jax.inference import decoding, editing
from srum_jax.pipeline import commands, generate
from srum_jax.rewards.parsing import strip_think
from srum_jax.workdir import layout, logs

# Keys that choose inputs or cut the work, not what an output looks like (not in settings.json).
INPUT_KEYS = {"sample": ("prompts", "prompts_file", "seeds", "out", "batch_size"),
              "edit": ("image", "prompt", "requests", "seeds", "out", "batch_size"),
              "ask": ("image", "question", "requests", "out", "batch_size")}
MODEL_KEYS = ("dir", "official_dir", "inference_dtype", "compute_dtype", "param_dtype")


def think_system_prompts(config) -> Tuple[str, str]:
  """(generation, understanding) think system prompts for edit and ask, from the texts the config names
  (`texts.file`: the official ones imported from the user's checkouts, or the own set)."""
  texts = commands.config_texts(config)
  return texts.gen_think_system, texts.judge_think_system


def out_dir(config, command: str) -> str:
  return str(config[command].out) or paths.join(str(config.workdir), command)


def seeds(config, command: str) -> List[int]:
  """The command's seeds; () means the config's `seed`."""
  return [int(s) for s in config[command].seeds] or [int(config.seed)]


def text_id(*parts: str) -> str:
  """A stable id for an input without one: 16 hex digits of SHA-256 over its parts."""
  return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()[:16]


def check_settings(config, command: str, directory: str) -> None:
  """Record the command's output-shaping settings in `<directory>/settings.json`, or stop (a
  `UserError`) when the folder holds outputs made with other ones (a resume would mix them)."""
  block = config[command].to_dict()
  settings = {k: v for k, v in block.items() if k not in INPUT_KEYS[command]}
  settings["model"] = {k: str(config.model[k]) for k in MODEL_KEYS}
  settings = json.loads(json.dumps(settings))
  path = paths.join(directory, "settings.json")
  old = files.read_json_if_present(path, "settings file")
  if old is not None and old != settings:
    keys = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    raise UserValueError(
        f"{directory} holds {command} outputs made with other settings ({', '.join(keys)}): set "
        f"--config.{command}.out to another folder, or delete it")
  if old is None and distributed.is_main():
    files.write_json(path, settings)


# ----------------------------------------------------------------------------------------------
# sample


def sample_items(scfg) -> List[PromptItem]:
  """`sample.prompts_file`'s prompts (its ids), then `sample.prompts` (ids: a hash of the text)."""
  items = []
  if scfg.prompts_file:
    items += load_prompts(prompt_source(source="file", path=scfg.prompts_file))
  items += [PromptItem(id=text_id(p.strip()), prompt=p.strip(), category="prompt")
            for p in scfg.prompts]
  return items


def write_plans(directory: str) -> int:
  """Each think-mode image's plan as `<image file>.txt` beside it (once); returns how many."""
  written = 0
  for row in layout.read_metadata(directory):
    txt = paths.join(directory, os.path.splitext(row["image_file"])[0] + ".txt")
    if isinstance(row.get("think"), str) and not paths.path(txt).exists():
      paths.write_bytes(txt, (row["think"] + "\n").encode("utf-8"))
      written += 1
  return written


def sample(config, model: loaded_model.Model) -> Dict[int, generate.GenerateReport]:
  """Generate `sample`'s prompts once per seed (`pipeline.generate`, resumable); the reports."""
  items = sample_items(config.sample)
  require_prompts(items, "sample.prompts")
  out, reports = out_dir(config, "sample"), {}
  check_settings(config, "sample", out)
  for seed in seeds(config, "sample"):
    d = paths.join(out, f"seed_{seed}")
    reports[seed] = generate.generate(config.sample, model, items, d, seed=seed,
                                      texts=commands.config_texts(config),
                                      compute_dtype=config.model.compute_dtype,
                                      attn_impl=loaded_model.attn_impl(config))
    if distributed.is_main():
      write_plans(d)
      wanted = {it.id for it in items}
      for row in layout.read_metadata(d):
        if row["prompt_id"] in wanted:
          print(f"{paths.join(d, row['image_file'])}\t{row['prompt']}", flush=True)
  return reports


# ----------------------------------------------------------------------------------------------
# edit and ask: requests of (image, text)


@dataclasses.dataclass(frozen=True)
class Request:
  id: str
  image: str  # path as given (a requests file's relative paths resolved against its folder)
  text: str


def read_requests(block, text_key: str, key: str) -> List[Request]:
  """The block's JSONL `requests` ({"image", <text_key>, "id" optional} per line), then its single
  `image` + text. A line that is not such an object is a `UserValueError` naming file and line."""
  out = []
  if block.requests:
    folder = os.path.dirname(os.path.abspath(block.requests))
    text = paths.path(block.requests).read_bytes().decode("utf-8", errors="replace")
    for n, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        image, words = str(row["image"]), str(row[text_key])
      except (json.JSONDecodeError, KeyError, TypeError):
        raise UserValueError(
            f"config key {key}.requests: {block.requests} line {n} is not a JSON object with "
            f"'image' and '{text_key}'") from None
      absolute = paths.is_remote(image) or os.path.isabs(image)
      path = image if absolute else os.path.join(folder, image)
      out.append(Request(str(row.get("id") or text_id(image, words)), path, words))
  if block.image:
    out.append(Request(text_id(block.image, block[text_key]), block.image, str(block[text_key])))
  if not out:
    raise UserValueError(
        f"config key {key}.image: give an image (and {key}.{text_key}) or {key}.requests")
  return out


def _load_image(req: Request) -> Image.Image:
  array, why = files.load_rgb(req.image)
  if array is None:
    raise UserFileNotFoundError(f"image {req.image!r} (request {req.id}) is {why}")
  return Image.fromarray(array)


def _check_vit_transform(config, key: str, model: loaded_model.Model) -> None:
  cfg = model.cfg
  most = cfg.vit_max_num_patch_per_side * cfg.vit.patch_size
  if int(config[key].vit_transform[0]) > most:
    raise UserValueError(
        f"config key {key}.vit_transform={tuple(config[key].vit_transform)}: this model's ViT "
        f"sees at most {most} pixels a side (vit_max_num_patch_per_side x patch size)")


def _chunks(rows: Sequence, size: int):
  """(batch, real rows): batches of `size`, the last padded by repeating its last row (one compiled
  shape)."""
  for chunk in distributed.batched(list(rows), size):
    yield loaded_model.pad_rows(chunk, size), len(chunk)


def edit_settings(config) -> dict:
  """`editing.edit_images`' keyword arguments from the `edit` block and the model's dtypes."""
  e = config.edit
  return dict(think=bool(e.think), num_timesteps=int(e.num_timesteps),
              timestep_shift=float(e.timestep_shift), cfg_text_scale=float(e.cfg_text_scale),
              cfg_img_scale=float(e.cfg_img_scale), cfg_interval=tuple(e.cfg_interval),
              cfg_renorm_type=str(e.cfg_renorm_type), cfg_renorm_min=float(e.cfg_renorm_min),
              max_think_tokens=int(e.max_think_tokens), sample_posterior=bool(e.sample_posterior),
              dtype=jnp.dtype(config.model.compute_dtype), text_budget=int(e.text_budget) or None,
              attn_impl=loaded_model.attn_impl(config))


def save_image(directory: str, item_id: str, image, plan) -> str:
  """An output PNG under `directory/images` (and its plan beside it as .txt); its relative path."""
  rel = f"images/{layout.image_file_name(item_id)}"
  files.save_png(paths.join(directory, rel), image)
  if plan is not None:
    txt = paths.join(directory, os.path.splitext(rel)[0] + ".txt")
    paths.write_bytes(txt, f"{plan}\n".encode("utf-8"))
  return rel


def edit(config, model: loaded_model.Model) -> Dict[int, int]:
  """Edit every request once per seed (resumable); returns {seed: images written}."""
  ecfg = config.edit
  _check_vit_transform(config, "edit", model)
  requests = read_requests(ecfg, "prompt", "edit")
  out = out_dir(config, "edit")
  check_settings(config, "edit", out)
  gen_system = think_system_prompts(config)[0] if ecfg.think else None
  settings, size = edit_settings(config), int(ecfg.batch_size)
  mesh = loaded_model.batch_rows_mesh(model, size)
  run = loaded_model.on_mesh(model, editing.edit_images)
  written = {}
  for seed in seeds(config, "edit"):
    d = paths.join(out, f"seed_{seed}")
    log = logs.process_log(d, "metadata")
    done = {r["id"] for r in layout.read_metadata(d)}
    todo = [r for r in distributed.process_shard(requests) if r.id not in done]
    views = {r.id: editing.input_views(_load_image(r), ecfg.vae_transform, ecfg.vit_transform)
             for r in todo}
    by_size: Dict[tuple, list] = {}  # a batch edits images of one size
    for r in todo:
      by_size.setdefault(views[r.id][0].shape[:2], []).append(r)
    bar, written[seed] = progress.bar(len(todo), f"edit seed {seed}"), 0
    for group in by_size.values():
      for chunk, real in _chunks(group, size):
        ids = [layout.stable_int(r.id) for r in chunk]
        res = run(model.params["bagel"], model.params["ae"], model.tokenizer,
                  [views[r.id] for r in chunk], [r.text for r in chunk], cfg=model.cfg,
                  system_prompt=gen_system, seeds=seed, image_ids=ids, mesh=mesh, **settings)
        images, rows = jax.device_get(res.images), []
        for j, r in enumerate(chunk[:real]):
          plan = res.think_texts[j] if res.think_texts else None
          rel = save_image(d, r.id, images[j], plan)
          rows.append({"id": r.id, "image": r.image, "prompt": r.text, "seed": seed,
                       "image_seed_id": ids[j], "image_file": rel, "think": plan})
          print(f"{paths.join(d, rel)}\t{r.text}", flush=True)
        log.extend(rows)  # the batch's rows in one write, after their PNGs
        written[seed] += len(rows)
        bar.update(real)
    bar.close()
    progress.summary_line("edit", seed=seed, requested=len(requests),
                          skipped_done=len(requests) - len(todo), edited=written[seed], out=d)
  return written


def ask(config, model: loaded_model.Model) -> List[dict]:
  """Answer every request (resumable); returns this run's rows ({id, image, question, answer,
  text}). Greedy by default; with `do_sample` a batch's draws are keyed by (seed, batch index)."""
  acfg = config.ask
  _check_vit_transform(config, "ask", model)
  requests = read_requests(acfg, "question", "ask")
  out = out_dir(config, "ask")
  check_settings(config, "ask", out)
  _, und_system = think_system_prompts(config)
  log = logs.process_log(out, "answers")
  done = {r["id"] for r in logs.read_rows(out, "answers", schema={"answer": logs.Field(logs.is_str)})}
  todo = [r for r in distributed.process_shard(requests) if r.id not in done]
  size = int(acfg.batch_size)
  mesh = loaded_model.batch_rows_mesh(model, size)
  sampled = bool(acfg.do_sample)
  key = jax.random.PRNGKey(int(config.seed))
  new = []
  for n, (chunk, real) in enumerate(_chunks(todo, size)):
    views = [editing.input_views(_load_image(r), acfg.vae_transform, acfg.vit_transform)[1]
             for r in chunk]
    texts = loaded_model.on_mesh(model, decoding.answer_text)(
        model.params["bagel"], model.tokenizer, views, [r.text for r in chunk], cfg=model.cfg,
        system_prompt=und_system if acfg.think else None, max_new_tokens=int(acfg.max_new_tokens),
        temperature=float(acfg.temperature) if sampled else 0.0,
        key=jax.random.fold_in(key, n) if sampled else None,
        dtype=jnp.dtype(config.model.compute_dtype), text_budget=int(acfg.text_budget) or None,
        attn_impl=loaded_model.attn_impl(config), mesh=mesh)
    rows = [{"id": r.id, "image": r.image, "question": r.text,
             "answer": strip_think(t) if acfg.think else t, "text": t}
            for r, t in zip(chunk[:real], texts)]
    for row in rows:
      print(f"[{row['id']}] {row['image']}: {row['question']}\n{row['answer']}\n", flush=True)
    log.extend(rows)
    new += rows
  progress.summary_line("ask", requested=len(requests), skipped_done=len(requests) - len(todo),
                        answered=len(new), out=out)
  return new


# ----------------------------------------------------------------------------------------------
# Entry points (the CLI's `sample`, `edit`, `ask`): the stages' model loading and workdir lock

_model = commands._model  # noqa: SLF001  (the stages' one way to load `model.*` for inference)


@commands.locked
def sample_main(config, flags) -> int:
  reports = sample(config, _model(config))
  return 1 if any(r.skipped_nonfinite for r in reports.values()) else 0


@commands.locked
def edit_main(config, flags) -> int:
  edit(config, _model(config))
  return 0


@commands.locked
def ask_main(config, flags) -> int:
  ask(config, _model(config))
  return 0
