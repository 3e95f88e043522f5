"""Test setup: 8 simulated CPU devices (set before jax is imported) and the golden fixtures."""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

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
