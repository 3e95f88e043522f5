"""Test setup: 8 simulated CPU devices (set before jax is imported), a persistent XLA compilation cache shared
by the test workers and the subprocesses they start (the same tiny programs compile in many tests), and the
golden fixtures."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "srum_jax_tests_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pathlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from srum_jax.convert import checkpoint, keymap
from srum_jax.models import config, params as params_lib
from srum_jax.tokenizer import build_word_level
from srum_jax.worlds.shapes import VOCAB

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "bagel_tiny"


@pytest.fixture(scope="session")
def golden_cases():
  """All tensors of cases.safetensors and srum_cases.safetensors, by their 'case.name' keys."""
  cases = dict(load_file(GOLDEN / "cases.safetensors"))
  cases.update(load_file(GOLDEN / "srum_cases.safetensors"))
  return cases


@pytest.fixture(scope="session")
def golden_manifest():
  import json
  return json.loads((GOLDEN / "manifest.json").read_text())


@pytest.fixture(scope="session")
def golden_weights():
  """Official-name tiny BAGEL state dict (float32 numpy)."""
  return dict(load_file(GOLDEN / "weights.safetensors"))


@pytest.fixture(scope="session")
def golden_ae_weights():
  return dict(load_file(GOLDEN / "ae.safetensors"))


def tree_from_state_dict(state_dict, entries, schema):
  """Official-name numpy state dict -> parameter tree, via the converter's key table (test helper)."""
  tree = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), schema, is_leaf=params_lib.is_spec)
  for key, e in entries.items():
    value = state_dict[key]
    perm = keymap.PERMS[e.transform]
    value = value if perm is None else np.transpose(value, perm)
    leaf = keymap.get_path(tree, e.path)
    if e.layer is None:
      leaf[...] = value
    else:
      leaf[e.layer] = value
  return tree


@pytest.fixture(scope="session")
def tiny_cfg():
  return config.tiny()


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg, golden_weights, golden_ae_weights):
  """{'bagel': ..., 'ae': ...} trees of the golden tiny model (float32 numpy)."""
  keys = keymap.official_keys(tiny_cfg)
  return {"bagel": tree_from_state_dict(golden_weights, keys["bagel"], params_lib.bagel_schema(tiny_cfg)),
          "ae": tree_from_state_dict(golden_ae_weights, keys["ae"], params_lib.ae_schema(tiny_cfg.ae))}


JUDGE_WORDS = ("Score:", "Reason:", "Region", "ID:", "Identified", "Object:", "-1.0", "-0.5", "0.0", "0.5", "1.0")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_cfg, tiny_params):
  """A model directory (orbax params + model_config.json + word-level tokenizer.json) of the golden tiny
  BAGEL, laid out like a converted checkpoint, with the shapes world's words in its vocabulary."""
  d = tmp_path_factory.mktemp("tiny_model")
  checkpoint.save_model_dir(str(d), tiny_cfg, jax.tree.map(np.asarray, tiny_params))
  t = tiny_cfg.tokens
  build_word_level(list(VOCAB) + list(JUDGE_WORDS), d, special_ids={
      "<|im_start|>": t.bos, "<|im_end|>": t.eos, "<|vision_start|>": t.start_of_image,
      "<|vision_end|>": t.end_of_image})
  return str(d)
