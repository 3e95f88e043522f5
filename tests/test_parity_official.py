"""`benchmarks/parity_official.py`: its JAX half against the official golden cases at tiny size (the
`flow` case's text-only context is a T2I context; `decode` is the judge's image + question context
with greedy tokens and their logits), its command line on an official-layout tiny checkpoint, the
reading of the official system prompt, and the flash-attention fallback of its official half against
a NumPy statement of attention.

Tolerances: atol = rtol = 1e-4 against the fp32 goldens (measured ~1e-6); tokens exact.
"""
import json
import pathlib
import shutil
import sys

import numpy as np
import pytest

from srum_jax.tokenizer import build_word_level

from helpers import load_script  # noqa: E402

GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "bagel_tiny"

ATOL = RTOL = 1e-4


@pytest.fixture(scope="module")
def parity():
  return load_script("benchmarks/parity_official.py")


def test_jax_half_reproduces_the_golden_cases(parity, golden_cases, tiny_params, tiny_cfg):
  c = golden_cases
  judge = [("vit", c["decode.vit_image"].transpose(1, 2, 0)), ("text", c["decode.prompt_ids"])]
  inputs = {"noise": c["flow.init_noise"], "t": c["flow.t0"][0], "size": np.array([32, 24]),
            "num_tokens": 5, "cfg_text_scale": 4.0}
  parts = {"t2i": [("text", c["flow.prompt_ids"])], "judge": judge, "think": judge}
  out = parity.jax_half(tiny_params, tiny_cfg, inputs, parts=parts)
  # The golden cfg_img context is the prompt alone ([BOS, ids, EOS] at 0..6, the query at 7): T2I.
  np.testing.assert_allclose(out["t2i.v_cond"], c["flow.v_img_uncond"], atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(out["judge.logits"], c["decode.step_logits"][:5], atol=ATOL, rtol=RTOL)
  np.testing.assert_array_equal(out["judge.tokens"], c["decode.generated_tokens"][1:6])
  np.testing.assert_array_equal(out["think.tokens"], out["judge.tokens"])
  assert out["t2i.v_uncond"].shape == out["t2i.v_cfg"].shape == c["flow.v_img_uncond"].shape
  assert parity.compare(out, out)[0].startswith("judge.logits   max |diff| 0.000e+00")


def test_command_line_jax_half_on_an_official_layout_checkpoint(parity, tmp_path):
  """--half=jax on the golden weights laid out as an official checkpoint: inputs, outputs saved."""
  w = tmp_path / "weights"
  w.mkdir()
  shutil.copyfile(GOLDEN / "weights.safetensors", w / "ema.safetensors")
  shutil.copyfile(GOLDEN / "ae.safetensors", w / "ae.safetensors")
  cfg = json.loads((GOLDEN / "config.json").read_text())
  (w / "llm_config.json").write_text(json.dumps(cfg["llm_config"]))
  (w / "vit_config.json").write_text(json.dumps(cfg["vit_config_as_in_json"]))
  b, ae, t = cfg["bagel"], cfg["ae_params"], cfg["special_token_ids"]
  tokens = dict(bos=t["bos_token_id"], eos=t["eos_token_id"], start_of_image=t["start_of_image"],
                end_of_image=t["end_of_image"])
  extras = dict(max_latent_size=b["max_latent_size"], timestep_shift=b["timestep_shift"],
                vit_max_num_patch_per_side=b["vit_max_num_patch_per_side"], tokens=tokens,
                ae_resolution=ae["resolution"], scale_factor=ae["scale_factor"],
                shift_factor=ae["shift_factor"])
  (w / "srum_jax_extras.json").write_text(json.dumps(extras))
  special = {"<|im_start|>": 120, "<|im_end|>": 121, "<|vision_start|>": 122, "<|vision_end|>": 123}
  build_word_level("a red cup plan it".split(), w, special_ids=special)
  code = tmp_path / "Bagel"
  code.mkdir()
  (code / "inferencer.py").write_text('import torch\nGEN_THINK_SYSTEM_PROMPT = """plan it"""\n')
  out = tmp_path / "jax.npz"
  assert parity.main([f"--bagel_code={code}", f"--weights={w}", "--half=jax", f"--save={out}",
                      "--size=32,24", "--vae_transform=32,32,16", "--vit_transform=112,28,14",
                      "--jax_dtype=float32", "--prompt=a red cup", "--question=a cup",
                      "--num_tokens=3"]) == 0
  saved = np.load(out)
  assert saved["in.prompt_ids"].tolist() == [0, 1, 2]
  assert saved["in.think_system_ids"].tolist() == [3, 4]  # read from inferencer.py, not run
  assert saved["jax.t2i.v_cond"].shape == (4 * 3, 16) and saved["jax.think.tokens"].shape == (3,)
  assert np.isfinite(saved["jax.judge.logits"]).all() and "official.t2i.v_cond" not in saved


def test_official_constant_is_parsed_not_run(parity, tmp_path):
  source = 'raise SystemExit("never run")\nA = 1\nGEN = """two\nlines"""\n'
  (tmp_path / "inferencer.py").write_text(source)
  assert parity.official_constant(str(tmp_path), "GEN") == "two\nlines"
  with pytest.raises(ValueError, match="no string constant A"):
    parity.official_constant(str(tmp_path), "A")


def test_flash_attention_fallback_is_exact_attention(parity, monkeypatch):
  """Two packed segments, GQA (4 query heads on 2 kv heads), causal with more keys than queries
  (the KV-cache case: bottom-right aligned) and not, against softmax(q k^T / sqrt(d)) v in NumPy."""
  torch = pytest.importorskip("torch")
  monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
  if not parity.install_flash_attn_fallback():
    pytest.skip("flash-attn is installed: the fallback is not used")
  fn = sys.modules.pop("flash_attn").flash_attn_varlen_func
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(n, h, 8)).astype(np.float32) for n, h in ((5, 4), (9, 2), (9, 2)))
  cu_q = torch.tensor([0, 2, 5], dtype=torch.int32)
  cu_k = torch.tensor([0, 4, 9], dtype=torch.int32)
  for causal in (True, False):
    qkv = (torch.from_numpy(x) for x in (q, k, v))
    got = fn(*qkv, cu_q, cu_k, causal=causal).numpy()
    for (q0, q1), (k0, k1) in (((0, 2), (0, 4)), ((2, 5), (4, 9))):
      lq, lk = q1 - q0, k1 - k0
      for h in range(4):
        s = q[q0:q1, h] @ k[k0:k1, h // 2].T / np.sqrt(8)
        if causal:
          s = np.where(np.arange(lk)[None] <= np.arange(lq)[:, None] + lk - lq, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        want = (p / p.sum(-1, keepdims=True)) @ v[k0:k1, h // 2]
        np.testing.assert_allclose(got[q0:q1, h], want, atol=1e-5, rtol=1e-5)
