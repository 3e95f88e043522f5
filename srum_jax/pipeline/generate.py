"""Stage `generate`: the UMM draws candidate images for a prompt set (the official T2I inference: think
mode, Euler flow sampling with CFG; docs/bagel.md, "Flow sampler and CFG" and "Think mode").

Writes `images/<id>.png` (cropped to its non-black bounding box with `crop_to_content`, as SRUM's `t2i.py`
saves its candidates) and one `metadata.jsonl` row per image ({id, seq, prompt_id, prompt, category, seed,
image_file, think}; seq: the image's place in the prompt set's order, the order every later stage keeps).
Prompts longer than `prompt_token_cap` ids and images whose latents are not finite are skipped and counted
(`stats.json`, the summary line). Each image is seeded by (config.seed, its id), so any host, batch composition or
restart reproduces it; finished ids are skipped on restart. Multi-host: each process takes a round-robin
share of the prompts (on its own devices: `loaded_model.inference_mesh`) and writes its own
`metadata.<process>.jsonl`.
"""
from __future__ import annotations

import dataclasses
from typing import List, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from srum_jax import distributed, files, paths, progress
from srum_jax.data.prompt_sources import PromptItem
from srum_jax.engine import loaded_model
from srum_jax.inference import sampling
from srum_jax.rewards.texts import Texts
from srum_jax.models import image_transforms
from srum_jax.workdir import layout, logs


@dataclasses.dataclass
class GenerateReport:
  requested: int = 0
  skipped_done: int = 0
  skipped_empty: int = 0
  skipped_too_long: int = 0  # prompts over `prompt_token_cap` (never generated)
  skipped_nonfinite: int = 0  # images whose sampled latents held NaN / inf (no PNG, no row; retried on rerun)
  skipped_log_lines: int = 0  # unreadable or incomplete lines of the metadata logs (the items are redone)
  redone_bad_files: int = 0  # logged items whose PNG was missing or unreadable (made again)
  generated: int = 0
  failed: int = 0
  prompt_token_cap: int = 0


def expand(items: Sequence[PromptItem], samples_per_prompt: int) -> List[tuple]:
  """(image id, item) pairs: `id` for one sample per prompt, `id#k` for several."""
  if samples_per_prompt <= 1:
    return [(it.id, it) for it in items]
  return [(f"{it.id}#{k}", it) for it in items for k in range(samples_per_prompt)]


def prompt_token_cap(gcfg, model: loaded_model.Model, texts: Texts) -> int:
  """Prompt ids one generation accepts: the LLM's `max_position_embeddings` less what else takes positions
  (the prompt's BOS/EOS, in think mode the system prompt and the plan with their BOS/EOS, one position for
  the image's latent tokens), lowered to `max_prompt_tokens` and to `text_budget` (less BOS/EOS) when set."""
  used = 2 + 1
  if bool(gcfg.think):
    used += len(model.tokenizer.encode(texts.gen_think_system)) + 2 + int(gcfg.max_think_tokens) + 2
  cap = int(model.cfg.llm.max_position_embeddings) - used
  if int(gcfg.max_prompt_tokens):
    cap = min(cap, int(gcfg.max_prompt_tokens))
  if int(gcfg.text_budget):
    cap = min(cap, int(gcfg.text_budget) - 2)
  return cap


def done_items(out_dir: str, rows: Sequence[dict]) -> set:
  """The ids of `rows` (logged images) whose PNG is there and readable (`files.image_problem`); an
  image whose file went missing or was damaged is made again. One listing of the images folder
  (local files are also checked, cheaply: PNG chunk checksums, no decoding)."""
  present = layout.present_files(paths.join(out_dir, "images"))
  if present is None:
    return set()
  remote = paths.is_remote(out_dir)
  return {r["id"] for r in rows if r["image_file"].startswith("images/")
          and r["image_file"][len("images/"):] in present
          and (remote or files.image_problem(paths.join(out_dir, r["image_file"])) is None)}


def generate(gcfg, model: loaded_model.Model, items: Sequence[PromptItem], out_dir: str, *, seed: int,
             texts: Texts, compute_dtype="float32", attn_impl: str = "dense") -> GenerateReport:
  """Generate the missing images of `items` into `out_dir` (resumable). The model's parameters stay where
  they are (sharded over `model.mesh`); each batch's rows split over that mesh's batch axes. Think mode
  sends `texts.gen_think_system`."""
  rep = GenerateReport(prompt_token_cap=prompt_token_cap(gcfg, model, texts))
  log = logs.process_log(out_dir, "metadata")
  log_rep = logs.LogReport()
  logged = layout.read_metadata(out_dir, log_rep)
  done = done_items(out_dir, logged)
  rep.skipped_log_lines = log_rep.skipped
  todo, lengths, logged_ids = [], {}, {r["id"] for r in logged}
  expanded = [(seq, image_id, it) for seq, (image_id, it) in enumerate(expand(items, int(gcfg.samples_per_prompt)))]
  for seq, image_id, it in distributed.process_shard(expanded):
    rep.requested += 1
    if not it.prompt.strip():
      rep.skipped_empty += 1
    elif image_id in done:
      rep.skipped_done += 1
    elif image_id in logged_ids:
      rep.redone_bad_files += 1
      todo.append((seq, image_id, it))
    elif lengths.setdefault(it.id, len(model.tokenizer.encode(it.prompt))) > rep.prompt_token_cap:
      rep.skipped_too_long += 1
    else:
      todo.append((seq, image_id, it))
  mesh = loaded_model.batch_rows_mesh(model, int(gcfg.batch_size))
  if mesh is None and loaded_model.batch_ways(model) > 1:
    print(f"[generate] generate.batch_size={gcfg.batch_size} does not divide over the inference mesh's "
          f"{loaded_model.batch_ways(model)} batch shards: rows are replicated", flush=True)
  params = model.params
  bar = progress.bar(len(todo), "generate")
  for chunk in distributed.batched(todo, int(gcfg.batch_size)):
    if len(chunk) < int(gcfg.batch_size):  # pad the last batch: one compiled shape for the whole stage
      chunk = list(chunk) + [chunk[-1]] * (int(gcfg.batch_size) - len(chunk))
      real = len(set(i for _, i, _ in chunk))
    else:
      real = len(chunk)
    ids = [layout.stable_int(image_id) for _, image_id, _ in chunk]
    res = loaded_model.on_mesh(model, sampling.text_to_image)(
        params["bagel"], params["ae"], model.tokenizer, [it.prompt for _, _, it in chunk], cfg=model.cfg,
        think=bool(gcfg.think), seeds=int(seed), image_ids=ids, height=int(gcfg.height), width=int(gcfg.width),
        num_timesteps=int(gcfg.num_timesteps), timestep_shift=float(gcfg.timestep_shift),
        cfg_text_scale=float(gcfg.cfg_text_scale), cfg_img_scale=float(gcfg.cfg_img_scale),
        cfg_interval=tuple(gcfg.cfg_interval), cfg_renorm_type=str(gcfg.cfg_renorm_type),
        cfg_renorm_min=float(gcfg.cfg_renorm_min), max_think_tokens=int(gcfg.max_think_tokens),
        system_prompt=texts.gen_think_system if bool(gcfg.think) else None, dtype=jnp.dtype(compute_dtype), text_budget=int(gcfg.text_budget) or None, attn_impl=attn_impl,
        mesh=mesh)
    images = jax.device_get(res.images)
    finite = np.isfinite(np.asarray(jax.device_get(res.latents))).reshape(len(chunk), -1).all(axis=1)
    rows = []
    for j, (seq, image_id, it) in enumerate(chunk[:real]):
      if not finite[j]:  # NaN / inf latents decode to a black image: never written as if it were fine
        rep.skipped_nonfinite += 1
        continue
      rel = f"images/{layout.image_file_name(image_id)}"
      image = image_transforms.crop_to_content(images[j]) if gcfg.crop_to_content else images[j]
      files.save_png(paths.join(out_dir, rel), image)  # crop: SRUM's t2i.py saves the non-black box
      rows.append({"id": image_id, "seq": seq, "prompt_id": it.id, "prompt": it.prompt, "category": it.category,
                  "seed": int(seed), "image_seed_id": ids[j], "image_file": rel,
                  "think": (res.think_texts[j] if res.think_texts else None)})
      rep.generated += 1
    log.extend(rows)  # the batch's rows in one write, each after its PNG
    bar.update(real)
  bar.close()
  distributed.barrier(f"generate:{out_dir}")  # the next stage reads every process's images
  suffix = "" if jax.process_count() == 1 else f".{jax.process_index()}"
  files.write_json(paths.join(out_dir, f"stats{suffix}.json"), {"report": dataclasses.asdict(rep)})
  progress.summary_line("generate", **dataclasses.asdict(rep), out=out_dir)
  if rep.skipped_too_long:
    print(f"[generate] {rep.skipped_too_long} images skipped: their prompts exceed {rep.prompt_token_cap} "
          f"token ids (generate.max_prompt_tokens / the model's positions)", flush=True)
  if rep.skipped_nonfinite:
    print(f"[generate] {rep.skipped_nonfinite} images skipped: non-finite (NaN / inf) latents; check the "
          f"model's weights", flush=True)
  return rep
