"""T2I-CompBench prompts as a tensorflow-datasets builder (array_record files: no tensorflow
needed).

Source: the official T2I-CompBench repository's `examples/dataset/{category}_{split}.txt` (one
prompt per line), downloaded from GitHub with `dl_manager.download` -- or read from a local
directory holding those files, given either as the builder kwarg `local_dir` or as tfds' manual dir
(`DownloadConfig(manual_dir=...)`, default `<data_dir>/downloads/manual`). Order of precedence:
`local_dir`, a non-empty manual dir, download.

  from srum_jax.data.t2i_compbench import T2iCompbench   # importing registers "t2i_compbench"
  builder = T2iCompbench(data_dir="~/tfds", local_dir="T2I-CompBench/examples/dataset")
  builder.download_and_prepare()
  source = builder.as_data_source(split="val")           # random access, no tensorflow
  # {"prompt": b"a green bench and a red car", "category": b"color", "id": b"color_val:00001"}
  source[0]

  # or: tfds.data_source("t2i_compbench", split="val", data_dir="~/tfds",
  builder_kwargs={"local_dir": ...})

Features: `prompt`, `category` (the file's category name, e.g. "non_spatial") and `id`
(`{category}_{split}:{line:05d}`, the 1-based line number: stable and unique). Blank lines are
skipped (and counted in the log). Examples keep file order (category order of the config, then line
order): shuffling is disabled. Splits: `train`, `val`.

Configs: `original` (default) = the six categories of T2I-CompBench (color, shape, texture, spatial,
non_spatial, complex); `plus` adds T2I-CompBench++'s 3d_spatial and numeracy.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

import tensorflow_datasets as tfds
from etils import epath

__all__ = [
    "T2iCompbench", "T2iCompbenchConfig", "CATEGORIES", "PLUS_CATEGORIES", "SPLITS", "file_name",
    "source_url"
]

CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "complex")
PLUS_CATEGORIES = CATEGORIES + ("3d_spatial", "numeracy")
SPLITS = ("train", "val")
_BASE_URL = "https://raw.githubusercontent.com/Karine-Huang/T2I-CompBench/main/examples/dataset/"
_CITATION = """@inproceedings{huang2023t2icompbench,
  title={T2I-CompBench: A Comprehensive Benchmark for Open-world Compositional Text-to-image
  Generation}, author={Huang, Kaiyi and Sun, Kaiyue and Xie, Enze and Li, Zhenguo and Liu, Xihui},
  booktitle={Advances in Neural Information Processing Systems}, year={2023}
}"""

log = logging.getLogger(__name__)


def file_name(category: str, split: str) -> str:
  return f"{category}_{split}.txt"


def source_url(category: str, split: str) -> str:
  return _BASE_URL + file_name(category, split)


@dataclasses.dataclass
class T2iCompbenchConfig(tfds.core.BuilderConfig):
  """A builder config: which categories' prompt files make up the dataset."""
  categories: tuple[str, ...] = CATEGORIES


class T2iCompbench(tfds.core.GeneratorBasedBuilder):
  """T2I-CompBench compositional prompts (train / val), one example per non-blank line."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Prompts, categories and line-based ids of the official prompt files."}
  BUILDER_CONFIGS = [
      T2iCompbenchConfig(name="original", categories=CATEGORIES,
                         description="The six T2I-CompBench categories."),
      T2iCompbenchConfig(
          name="plus", categories=PLUS_CATEGORIES,
          description="T2I-CompBench++: the six categories plus 3d_spatial and numeracy."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Optional. Put the official `examples/dataset/{category}_{train,val}.txt` files of "
    "https://github.com/Karine-Huang/T2I-CompBench in the manual dir to build without network access.")

  def __init__(self, *, local_dir: Optional[str] = None, file_format: str = "array_record",
               **kwargs):
    self._local_dir = None if local_dir is None else os.path.expanduser(os.fspath(local_dir))
    super().__init__(file_format=file_format, **kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    """This file. (tfds' own lookup touches the `importlib_resources` backport, absent on Python
    >= 3.9.)"""
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Text prompts of T2I-CompBench (compositional text-to-image generation), by "
                    "category.",
        features=tfds.features.FeaturesDict({
            "prompt": tfds.features.Text(),
            "category": tfds.features.Text(),
            "id": tfds.features.Text(),
        }),
        supervised_keys=None,
        disable_shuffling=True,
        homepage="https://github.com/Karine-Huang/T2I-CompBench",
        citation=_CITATION,
    )

  def _source_dir(self, dl_manager) -> Optional[str]:
    """The local directory to read from (kwarg, then a non-empty manual dir), or None to
    download."""
    if self._local_dir is not None:
      if not os.path.isdir(self._local_dir):
        raise FileNotFoundError(f"T2I-CompBench local_dir not found: {self._local_dir}")
      return self._local_dir
    try:
      return os.fspath(dl_manager.manual_dir)
    except AssertionError:  # no manual dir, or an empty one
      return None

  def _split_generators(self, dl_manager):
    cats = tuple(self.builder_config.categories)
    local = self._source_dir(dl_manager)
    if local is not None:
      paths = {(c, s): os.path.join(local, file_name(c, s)) for c in cats for s in SPLITS}
      missing = sorted(p for p in paths.values() if not os.path.isfile(p))
      if missing:
        raise FileNotFoundError(
            f"T2I-CompBench prompt files missing in {local}: {', '.join(missing)}")
    else:
      urls = {f"{c}_{s}": source_url(c, s) for c in cats for s in SPLITS}
      got = dl_manager.download(urls)
      paths = {(c, s): os.fspath(got[f"{c}_{s}"]) for c in cats for s in SPLITS}
    return {s: self._generate_examples([(c, paths[(c, s)]) for c in cats], s) for s in SPLITS}

  def _generate_examples(self, files, split):
    for category, path in files:
      blank = 0
      with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
          prompt = line.strip()
          if not prompt:
            blank += 1
            continue
          key = f"{category}_{split}:{lineno:05d}"
          yield key, {"prompt": prompt, "category": category, "id": key}
      if blank:
        log.warning("%s: skipped %d blank line(s)", path, blank)
