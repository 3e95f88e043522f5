"""The paper recipe (`experiments/bagel_7b_compbench.py`) starts on 8, 16, 32 and 64 devices: the mesh, the
per-device rows and the gradient accumulation are derived so that every update sees the same 16 images, and
its train step (fp32 master weights, bf16 compute, attention `auto`: xla on CPU devices, remat) and inference programs lower with
BAGEL-7B's abstract shapes. 64 simulated CPU devices in a subprocess; nothing is allocated or compiled."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from srum_jax.data.prompt_sources import load_prompts

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=64"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, sys.argv[1])
import jax
from srum_jax import aot, config_utils
config = config_utils.load_config(os.path.join(sys.argv[1], "experiments/bagel_7b_compbench.py"))
out = {"train": {}, "inference": {}}
for n in (8, 16, 32, 64):
  prog = aot.train_step_program(config, jax.devices()[:n])
  lowered = prog.jitted.lower(*prog.args)
  state = prog.args[0]
  out["train"][n] = dict(prog.info, lowered=lowered is not None,
                         master_dtypes=sorted({str(x.dtype) for x in jax.tree.leaves(state.params)}),
                         batch_rows=int(prog.args[1].rewards.global_scores.shape[0]))
for build in (aot.sampler_step_program, aot.prefill_program, aot.judge_program):
  prog = build(config, jax.devices()[:8])
  prog.jitted.lower(*prog.args)
  out["inference"][prog.name] = prog.info
out["prompts"] = dict(config.prompts.train.to_dict(), categories=None)
print("RESULT " + json.dumps(out))
'''


@pytest.mark.slow
def test_recipe_lowers_on_8_to_64_devices():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT)], capture_output=True, text=True, timeout=900,
                        env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
  want = {8: ({"data": 1, "fsdp": 8, "tensor": 1}, 8, 2), 16: ({"data": 1, "fsdp": 16, "tensor": 1}, 16, 1),
          32: ({"data": 1, "fsdp": 16, "tensor": 2}, 16, 1), 64: ({"data": 1, "fsdp": 16, "tensor": 4}, 16, 1)}
  for n, (mesh, ways, micro) in want.items():
    got = out["train"][str(n)]
    assert got["lowered"] and got["mesh"] == mesh, (n, got)
    assert (got["batch_ways"], got["microbatches"]) == (ways, micro), (n, got)
    # the same update everywhere: 16 rows of one 1024^2 image, fp32 master weights
    assert got["rows"] == got["batch_rows"] == 16 and got["samples_per_row"] == 1
    assert got["master_dtypes"] == ["float32"]
    assert got["params"] > 14e9
    assert got["attn_impl"] == "xla"  # `auto` resolved for the (CPU) devices' platform
  inf = out["inference"]
  assert inf["sampler_step"]["mesh"] == {"data": 2, "fsdp": 1, "tensor": 4}  # 8 devices: one host's worth
  assert inf["sampler_step"]["latent_tokens"] == 4096 and inf["sampler_step"]["branches"] == 2
  assert inf["judge"]["vit_patches"] == 70 * 70
  assert out["prompts"]["source"] == "file" and out["prompts"]["path"] == "SRUM/train_comp.json"


def test_srum_train_prompts_load_with_ten_categories(tmp_path):
  """The recipe's prompt file format (SRUM's train_comp.json): Question / Category / Question_id."""
  rows = [{"Question": f"a prompt {i}", "Category": c, "Question_id": i}
          for i, c in enumerate(["3d_spatial", "color", "complex", "non-spatial", "numeracy", "shape", "spatial",
                                 "texture", "complex_action", "complex_spatial"])]
  path = tmp_path / "train_comp.json"
  path.write_text(json.dumps(rows))
  items = load_prompts({"source": "file", "path": str(path)})
  assert len({it.category for it in items}) == 10 and [it.id for it in items] == [str(i) for i in range(10)]
