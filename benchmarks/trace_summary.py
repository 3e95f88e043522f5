"""Time by op category from a jax.profiler trace (the perfetto JSON that `jax.profiler.trace(...,
create_perfetto_trace=True)` writes, e.g. via `benchmarks/train_step.py --profile_dir DIR`).

    python benchmarks/trace_summary.py DIR [--top 25]

Device op events are read from the accelerator's processes (`/device:GPU:n` streams, or a TPU's "XLA
Ops" line); on a CPU-only trace the XLA client's worker threads stand in (plumbing only). Each op is
put in one category by its kernel name and, where the trace carries them, its HLO op name and
category (`CATEGORIES`, first match wins). Printed: the device-busy time per category and its share,
how much of the traced wall span (first to last device op) the ops cover (the rest is the device
idle: launch gaps, host waits), and the longest ops.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
from typing import Dict, List, Tuple

# (category, pattern on "kernel name | hlo_op | hlo_category", lowercase); first match wins.
CATEGORIES: Tuple[Tuple[str, str], ...] = (
    ("attention kernel", r"flash|fmha|splash|attn|attention|mha_|tokamax|mosaic"),
    ("collective", r"nccl|all-reduce|all_reduce|all-gather|all_gather|reduce-scatter|reduce_scatter|all-to-all"
                   r"|collective|\bsend\b|\brecv\b"),
    ("convolution", r"\bconv\b|conv_|convolution|fprop|dgrad|wgrad|implicit_gemm"),
    ("matmul", r"gemm|cublas|cutlass|xmma|wgmma|matmul|\bdot|nvjet|sm\d\d_"),
    ("gather/scatter", r"gather|scatter|dynamic-slice|dynamic_slice|dynamic-update-slice|dynamic_update_slice"),
    ("copy/transpose", r"memcpy|memset|copy|transpose|concatenate"),
    ("reduction", r"reduce|reduction|argmax|sort"),
    ("elementwise fusion", r"fusion|loop|elementwise|multiply|add|subtract|exp|convert|select|broadcast|ynn|eigen"),
)

_HOST_NOISE = re.compile(r"threadpoollistener|thunkexecutor|^end: |pjrt|await|execute")


def find_trace(path: str) -> str:
  """The newest perfetto trace under `path` (a file is taken as is)."""
  if os.path.isfile(path):
    return path
  found = sorted(
      glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True),
      key=os.path.getmtime)
  if not found:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {path}")
  return found[-1]


def load_events(path: str) -> List[dict]:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    d = json.load(f)
  return d["traceEvents"] if isinstance(d, dict) else d


def device_ops(events: List[dict]) -> Tuple[List[dict], str]:
  """(the device op events, where they came from)."""
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e["pid"]] = str(e.get("args", {}).get("name", ""))
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e.get("tid"))] = str(e.get("args", {}).get("name", ""))
  complete = [e for e in events if e.get("ph") == "X" and float(e.get("dur", 0)) > 0]
  dev = {p for p, n in procs.items() if "/device:" in n}
  if dev:
    tpu_ops = {k for k, n in threads.items() if k[0] in dev and n.strip().lower() == "xla ops"}
    if tpu_ops:  # TPU: the per-op line (other lines repeat the same time as modules / steps)
      return [e for e in complete if (e["pid"], e.get("tid")) in tpu_ops], "TPU XLA Ops line"
    return [e for e in complete if e["pid"] in dev
           ], "device streams: " + ", ".join(sorted(procs[p] for p in dev))
  workers = {k for k, n in threads.items() if n.startswith("tf_XLA")}
  return ([
      e for e in complete
      if (e["pid"], e.get("tid")) in workers and not _HOST_NOISE.search(e["name"].lower())
  ], "no device process: CPU XLA worker threads (plumbing only)")


def categorize(e: dict) -> str:
  args = e.get("args", {}) or {}
  key = " | ".join(str(v) for v in (e.get("name", ""), args.get("hlo_op", ""), args.get("hlo_category", ""),
                                    args.get("long_name", ""))).lower()
  for name, pattern in CATEGORIES:
    if re.search(pattern, key):
      return name
  return "other"


def summarize(path: str, top: int = 25, out=print) -> Dict[str, float]:
  """Print and return {category: seconds} plus '_busy', '_span' (seconds) and '_coverage' (busy /
  span)."""
  trace = find_trace(path)
  ops, source = device_ops(load_events(trace))
  if not ops:
    out(f"trace {trace}: no op events found ({source})")
    return {"_busy": 0.0, "_span": 0.0, "_coverage": 0.0}
  by_cat, by_op = collections.Counter(), collections.Counter()
  for e in ops:
    d = float(e["dur"]) * 1e-6  # trace times are microseconds
    by_cat[categorize(e)] += d
    by_op[(categorize(e), str((e.get("args") or {}).get("hlo_op") or e["name"])[:90])] += d
  busy = sum(by_cat.values())
  span = (max(float(e["ts"]) + float(e["dur"]) for e in ops) - min(float(e["ts"])
                                                                   for e in ops)) * 1e-6
  out(f"trace {trace}; {len(ops)} op events from {source}")
  out(f"device busy {busy:.4f} s over a traced span of {span:.4f} s: ops cover "
      f"{100 * busy / span:.1f}% of the span "
      f"(streams may overlap; the rest is idle)")
  for name, sec in by_cat.most_common():
    out(f"  {name:20s} {sec:10.4f} s  {100 * sec / busy:5.1f}%")
  out(f"top {top} ops:")
  for (cat, name), sec in by_op.most_common(top):
    out(f"  {sec:10.4f} s  {100 * sec / busy:5.1f}%  [{cat}] {name}")
  return dict(by_cat, _busy=busy, _span=span, _coverage=busy / span)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("path", help="a trace directory (searched) or a perfetto_trace.json.gz")
  ap.add_argument("--top", type=int, default=25)
  a = ap.parse_args(argv)
  try:
    return summarize(a.path, a.top)
  except FileNotFoundError as e:  # the traced run did not get that far
    print(f"trace_summary: {e}")
    return {}


if __name__ == "__main__":
  main()
