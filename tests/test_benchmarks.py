"""The benchmark scripts run end to end at tiny size and print their fields (timings are never asserted)."""
import gzip
import json
import types

import numpy as np
import pytest

from srum_jax.flops import bagel_flops

from helpers import load_script


def _bench(name):
  return load_script(f"benchmarks/{name}.py")


@pytest.mark.slow
def test_train_step_benchmark(capsys):
  b = _bench("train_step")
  r = b.main(["--preset", "tiny", "--image", "32x32", "--tokens", "64", "--text", "8", "--steps", "2", "--warmup", "1",
              "--compute_dtype", "float32", "--no_remat", "--attn_impl", "dense", "--peak_tflops", "2.5"])
  out = capsys.readouterr().out
  for field in ("device:", "peak 2.5 TFLOP/s from --peak_tflops", "step_ms", "tokens_per_s", "model_flops",
                "mfu_model", "counted_flops", "mfu_counted", "counted/model"):
    assert field in out, field
  cfg = b.model_config("tiny")
  n_lat = (32 // cfg.latent_downsample) ** 2
  assert r["tokens"] == 2 * (8 + 2 + n_lat)
  assert r["model_flops"] == bagel_flops(cfg, r["tokens"], [8 + 2 + n_lat] * 2)
  np.testing.assert_allclose(r["mfu_model"], r["model_flops"] / (r["step_ms"] / 1e3) / 2.5e12, rtol=1e-9)
  # XLA's count covers forward + backward + optimizer: more than the forward-and-backward model formula's
  # weight term alone would give for a third of the work, and finite
  assert np.isfinite(r["counted_flops"]) and r["counted_flops"] > r["model_flops"] / 3
  assert np.isfinite(r["loss"])


def test_device_peak_table(monkeypatch):
  b = _bench("train_step")
  for kind, want in (("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                     ("TPU v5p", 459.0), ("TPU v6 lite", 918.0), ("TPU v5 lite", 197.0)):
    monkeypatch.setattr(b.jax, "devices", lambda kind=kind: [types.SimpleNamespace(device_kind=kind, platform="x")])
    got_kind, peak, source = b.device_peak()
    assert (got_kind, peak) == (kind, want) and source.startswith("table")
  assert b.device_peak(123.0)[1:] == (123.0, "--peak_tflops")


def test_sample_benchmark(capsys):
  rows = _bench("sample").main(["--preset", "tiny", "--sizes", "32", "--steps", "3", "--repeats", "1",
                                "--dtype", "float32", "--text", "8"])
  out = capsys.readouterr().out
  assert "cfg_text_scale 4.0, cfg_img_scale 1.0" in out and "2 Euler updates" in out
  assert [r["size"] for r in rows] == [32]
  for r in rows:
    assert r["s_per_image"] > 0 and r["step_s"] > 0
    np.testing.assert_allclose(r["s_per_image"], r["prefill_s"] + r["sample_s"] + r["decode_s"], rtol=1e-9)
  assert out.count("s_per_image") == 1 and "size 32x32 (16 latent tokens)" in out


def test_spearman_matches_scipy():
  stats = pytest.importorskip("scipy.stats")
  j = _bench("judge")
  rng = np.random.default_rng(0)
  for _ in range(5):
    a = rng.integers(0, 5, 30).astype(float)  # many ties
    b = a + rng.normal(0, 2, 30)
    np.testing.assert_allclose(j.spearman(a, b), stats.spearmanr(a, b)[0], rtol=1e-12)
  assert np.isnan(j.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


@pytest.mark.slow
def test_judge_benchmark(capsys, tmp_path):
  r = _bench("judge").main(["--num", "4", "--workdir", str(tmp_path)])
  out = capsys.readouterr().out
  for field in ("logits: images_per_s", "generate: images_per_s", "parse_failures", "spearman_rho"):
    assert field in out, field
  assert len(r["logits"]["scores"]) == len(r["generate"]["scores"]) == 4
  assert all(-1.0 <= s <= 1.0 for s in r["logits"]["scores"])


def _trace(path, events, threads):
  meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}}]
  meta += [{"ph": "M", "pid": p, "tid": t, "name": "thread_name", "args": {"name": n}} for (p, t), n in threads.items()]
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": meta + events}, f)


def test_trace_summary_categories(tmp_path):
  ts = _bench("trace_summary")
  ev = lambda name, t, dur, pid=1, **args: {"ph": "X", "pid": pid, "tid": 7, "ts": t, "dur": dur, "name": name,  # noqa
                                             "args": args}
  events = [ev("sm90_xmma_gemm_bf16bf16_bf16f32", 0, 400), ev("loop_multiply_fusion", 400, 100),
            ev("fmha_fwd_kernel", 500, 200), ev("input_reduce_fusion", 700, 50),
            ev("some_kernel", 750, 50, hlo_op="gather.12"), ev("ncclDevKernel_AllReduce", 800, 100),
            ev("convert_element_type_fusion", 900, 50), ev("PjitFunction(step)", 0, 5000, pid=2)]
  path = tmp_path / "perfetto_trace.json.gz"
  _trace(path, events, {(1, 7): "Stream #1", (2, 7): "python"})
  got = ts.summarize(str(tmp_path), out=lambda *_: None)
  want = {"matmul": 400e-6, "elementwise fusion": 150e-6, "attention kernel": 200e-6, "reduction": 50e-6,
          "gather/scatter": 50e-6, "collective": 100e-6}
  for k, v in want.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-9, err_msg=k)
  np.testing.assert_allclose(got["_busy"], 950e-6, rtol=1e-9)  # the host event is not device time
  np.testing.assert_allclose(got["_span"], 950e-6, rtol=1e-9)
  # a TPU trace: only the "XLA Ops" line counts (the module line repeats the same time)
  _trace(path, [ev("fusion.1", 0, 30), ev("convolution.2", 30, 70), {**ev("jit_step", 0, 100), "tid": 8}],
         {(1, 7): "XLA Ops", (1, 8): "XLA Modules"})
  got = ts.summarize(str(path), out=lambda *_: None)
  np.testing.assert_allclose([got["_busy"], got["convolution"], got["elementwise fusion"]], [100e-6, 70e-6, 30e-6])


def test_trace_summary_on_a_cpu_trace(tmp_path, capsys):
  import jax
  import jax.numpy as jnp
  f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  x = jnp.ones((128, 128))
  f(x).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(2):
      f(x).block_until_ready()
  got = _bench("trace_summary").main([str(tmp_path)])
  assert "device busy" in capsys.readouterr().out or got["_busy"] == 0.0
  assert got["_busy"] <= got["_span"] + 1e-9 or got["_span"] == 0.0


def test_propose_benchmark(capsys):
  pytest.importorskip("torch")
  r = _bench("propose").main(["--preset", "tiny", "--images", "2", "--images_per_call", "2",
                              "--points_per_side", "4", "--points_per_batch", "8"])
  out = capsys.readouterr().out
  for field in ("preset tiny", "jax ", "torch ", "images/s", "boxes identical on",
                "jax / torch speed"):
    assert field in out, field
  assert r["jax"]["images_per_s"] > 0 and r["torch"]["images_per_s"] > 0
  assert r["identical_images"] == 2
