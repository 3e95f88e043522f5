"""What makes each stage's outputs: the `fingerprints.Unit`s of every command, built from the config
before any work (no model is loaded or converted: a model is named by its identity,
`loaded_model.identity_of`).

A unit's record holds the stage, the model identity, the seed, the stage's own settings (its config
block less `EXECUTION_KEYS`: batch sizes, logging, devices change how fast its outputs are made, not
what they are) and its inputs: the prompt set's digest, the fingerprints of the units it reads. A
training's fingerprint is the identity of the model it writes, so a chain of rounds is known before
the first one runs:

    eval/<name>   generation (images), judgments, metrics/<metric>      (`eval_units`)
    generate  ->  propose  ->  score  ->  train  ->  (model identity)   (`round_units`)

`claim` (`workdir.fingerprints.claim`) then stops a command whose workdir holds outputs another
configuration made, or discards them with `discard_stale`.
"""
from __future__ import annotations

import hashlib
from typing import Dict, List, Optional, Sequence

from srum_jax import paths
from srum_jax.data.prompt_sources import load_prompts
from srum_jax.pipeline import evaluate
from srum_jax.workdir import fingerprints
from srum_jax.workdir.fingerprints import Unit

# Keys of a block that change how fast its outputs are made (or where they go), not what they are.
EXECUTION_KEYS = {
    "generate": ("batch_size",),
    "propose": ("batch_size",),
    "score": ("batch_size",),
    "train": ("save_every", "keep_checkpoints", "log_every", "sample_every", "data_threads",
              "data_workers", "encode_batch", "microbatch_rows", "records", "images_root"),
}
GENERATE_OUTPUTS = ("images/", "stats*.json")


def _block(config, key: str, drop: Sequence[str] = ()) -> dict:
  """A config block as plain data, less `drop`."""
  node = config
  for part in key.split("."):
    node = node[part]
  data = node.to_dict() if hasattr(node, "to_dict") else dict(node)
  return {k: v for k, v in data.items() if k not in drop}


def _model_settings(config) -> dict:
  """The model keys every inference stage's outputs depend on (besides the model itself)."""
  m = config.model
  return {"compute_dtype": m.compute_dtype, "inference_dtype": m.inference_dtype or m.param_dtype}


def _settings(config, block: str) -> dict:
  """An inference stage's settings: its block less the execution keys, and the model's dtypes."""
  return dict(_block(config, block, EXECUTION_KEYS["score" if block == "score" else "generate"]),
              **_model_settings(config))


def prompts_digest(items) -> str:
  """The digest of a prompt set (ids, prompts, categories, in order)."""
  return fingerprints.digest([[it.id, it.prompt, it.category] for it in items])


def file_digest(path: str) -> str:
  """The SHA-256 of a file's bytes (a records file given by the user)."""
  return hashlib.sha256(paths.path(path).read_bytes()).hexdigest()


def generate_unit(config, directory: str, *, block: str, model: str, seed: int, items,
                  what: str) -> Unit:
  """The images and metadata `generate` (or an eval's generation: `block` "eval_generate") makes."""
  made_by = {"stage": "generate", "model": model, "seed": int(seed),
             "settings": _settings(config, block), "inputs": {"prompts": prompts_digest(items)}}
  return Unit(directory, "metadata", made_by, what, GENERATE_OUTPUTS)


def propose_unit(config, directory: str, generate_fp: Optional[str], what: str = "propose") -> Unit:
  made_by = {"stage": "propose",
             "settings": _block(config, "propose", EXECUTION_KEYS["propose"]),
             "inputs": {"generate": generate_fp}}
  return Unit(directory, "regions", made_by, what)


def score_unit(config, directory: str, *, model: str, seed: int, generate_fp: Optional[str],
               propose_fp: Optional[str], what: str = "score") -> Unit:
  made_by = {"stage": "score", "model": model, "seed": int(seed),
             "settings": _settings(config, "score"),
             "inputs": {"generate": generate_fp, "propose": propose_fp}}
  return Unit(directory, "rewards", made_by, what, ("stats*.json",))


def train_unit(config, directory: str, *, model: str, records: Dict[str, Optional[str]],
               objective: str, what: str = "train") -> Unit:
  """A training folder (checkpoints, data cache, logs, the model it writes): the whole folder is the
  unit. Its fingerprint is the identity of the trained model."""
  settings = {"train": _block(config, "train", EXECUTION_KEYS["train"]),
              "srum": _block(config, "srum"), "objective": objective,
              "param_dtype": config.model.param_dtype, "compute_dtype": config.model.compute_dtype}
  if int(config.model.lora.rank) > 0:  # LoRA trains another model (full fine-tunes: as before)
    settings["lora"] = _block(config, "model.lora")
  if float(config.srum.anchor_weight) > 0:  # the anchor's conditions shape the trained model
    settings["anchor_prompts"] = prompts_digest(
        load_prompts(config.prompts.anchor, "prompts.anchor"))
  made_by = {"stage": "train", "model": model, "seed": int(config.seed), "settings": settings,
             "inputs": records}
  return Unit(directory, "train", made_by, what, (".",))


def _judge_settings(config, model: Optional[str]) -> dict:
  e = config.eval
  out = {"judge": e.judge}
  if e.judge == "oracle":
    out["oracle_fn"] = e.oracle_fn
  elif e.judge == "self":
    out.update(self_threshold=e.self_threshold, model=model, seed=int(e.seed),
               score=_settings(config, "score"))
  else:
    out.update(hf_vlm_dir=e.hf_vlm_dir, mllm_torch_dtype=e.mllm.torch_dtype)
  return out


def _metric_settings(config, metric: str) -> dict:
  e = config.eval
  blocks = {"compbench": ("compbench",), "mllm": ("mllm",), "geneval": ("geneval",),
            "reasonbench": ("reasonbench", "mllm")}[metric]
  out = {b: _block(config, f"eval.{b}", ("batch_size",)) for b in blocks}
  if metric in ("compbench", "geneval"):
    out["torch_dtype"] = e.torch_dtype
  return out


def eval_units(config, out_dir: str, *, model: Optional[str], items, name: str,
               images_dir: Optional[str] = None) -> List[Unit]:
  """The units of `<workdir>/eval/<name>`: the images (generated by `model`, or the folder
  `images_dir`, default `eval.images_dir`; "": generated), the judge's verdicts and each metric's
  rows."""
  e = config.eval
  metrics = evaluate.parse_metrics(e.metrics)
  units = []
  images_dir = e.images_dir if images_dir is None else images_dir
  if images_dir:
    images = fingerprints.dir_identity(images_dir, small=0, recursive=True)
  else:
    gen = generate_unit(config, out_dir, block="eval_generate", model=model, seed=e.seed,
                        items=items, what=f"eval {name!r} images")
    units.append(gen)
    images = gen.fingerprint
  if "judge" in metrics:
    made_by = {"stage": "eval.judge", "settings": _judge_settings(config, model),
               "inputs": {"images": images}}
    units.append(Unit(out_dir, "judgments", made_by, f"eval {name!r} judge"))
  for m in metrics:
    if m != "judge":
      made_by = {"stage": f"eval.{m}", "settings": _metric_settings(config, m),
                 "inputs": {"images": images}}
      units.append(Unit(paths.join(out_dir, "metrics"), m, made_by, f"eval {name!r} {m}"))
  return units


def round_units(config, round_dir: str, *, model: str, seed: int, items,
                label: str) -> Dict[str, Unit]:
  """One SRUM round in `round_dir` (generate, propose, score, train) from the model `model`."""
  def where(stage):
    return paths.join(round_dir, stage)
  gen = generate_unit(config, where("generate"), block="generate", model=model, seed=seed,
                      items=items, what=f"{label} generate")
  prop = propose_unit(config, where("propose"), gen.fingerprint, what=f"{label} propose")
  score = score_unit(config, where("score"), model=model, seed=seed, generate_fp=gen.fingerprint,
                     propose_fp=prop.fingerprint, what=f"{label} score")
  train = train_unit(config, where("train"), model=model, records={"score": score.fingerprint},
                     objective="srum", what=f"{label} train")
  return {"generate": gen, "propose": prop, "score": score, "train": train}


def claim(config, units: Sequence[Unit]) -> None:
  """`fingerprints.claim` of `units` in the config's workdir, discarding stale ones when the config
  says (`discard_stale`)."""
  fingerprints.claim(units, str(config.workdir), discard_stale=bool(config.discard_stale))
