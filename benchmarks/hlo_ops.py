"""Op categories, FLOPs and bytes of a compiled XLA program, read from its HLO text
(`compiled.as_text()`).

XLA's `cost_analysis()` gives one total per program; the compiled module says what the total is made
of. This module parses the scheduled HLO module and walks it from the entry computation:
* every top-level instruction (a fusion, a custom call, a collective, a copy ...) is one op; its
  FLOPs are
  those of the dots / convolutions inside it (2 x output elements x contracted size), its bytes the
  sizes of its operands and results, as XLA's cost model counts a fusion (an operand the fusion only
  slices or gathers from counts the slice; the buffer an in-place dynamic-update-slice or scatter
  writes into counts the update, not the whole buffer);
* a `conditional` counts its costliest branch (a run takes one);
* a `while` loop's body is walked `trip count` times (the count is read from the loop's condition, a
  comparison of the induction variable with a constant): unlike `cost_analysis()`, which counts a
  loop body once, these totals are what the program runs. XLA TPU turns some all-gather + matmul
  pairs into such loops ("windowed einsum": the gathered operand arrives in pieces while the matmul
  runs), so the difference matters even when the layer scan is unrolled;
* each op gets one category (`CATEGORIES`), by what it is: a Pallas / Mosaic kernel
  (`tpu_custom_call`) is
  the attention kernel; collectives (all-gather, reduce-scatter, all-reduce, all-to-all,
  collective-permute, their async start/done pairs count once) are collectives; a fusion with a dot
  or convolution is a matmul; a fusion rooted in a gather / scatter / dynamic-slice /
  dynamic-update-slice (or holding a gather or scatter) is a gather/scatter; a copy, a transpose, or
  a fusion of only layout ops (copy, transpose, bitcast, reshape, broadcast, slice, concatenate,
  pad) is a copy/transpose; any other fusion or op is an elementwise fusion (reductions included).

Per-op time is not in the module. `roofline_seconds` gives each op max(FLOPs / peak, bytes / HBM
bandwidth), collectives bytes / ICI bandwidth: a lower bound per op, used to split XLA's own
estimated time by category, never as a replacement for it.
"""
from __future__ import annotations

import collections
import dataclasses
import re
from typing import Dict, Iterable, List, Optional, Tuple

CATEGORIES = ("matmul/convolution", "attention kernel", "elementwise fusion", "copy/transpose",
              "gather/scatter", "collective", "other")

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
               "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8,
               "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
LAYOUT_OPS = {
    "copy", "transpose", "bitcast", "reshape", "broadcast", "slice", "concatenate", "pad",
    "parameter", "constant", "tuple", "get-tuple-element", "bitcast-convert", "copy-start",
    "copy-done"
}
INDEXING_ROOTS = {"gather", "scatter", "dynamic-slice", "dynamic-update-slice"}
FREE_OPS = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
    "replica-id", "iota", "opt-barrier", "add-dependency"
}

_ARRAY = re.compile(r"\b(pred|[subfc]\d+|f8e4m3fn|f8e5m2|bf16|token)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*)?\{\s*$")


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape string (arrays and tuples of arrays; layouts ignored)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    n = 1
    for d in dims.split(","):
      if d:
        n *= int(d)
    total += n * DTYPE_BYTES.get(dtype, 4)
  return total


def shape_dims(shape: str) -> Tuple[int, ...]:
  m = _ARRAY.search(shape)
  return tuple(int(d) for d in m.group(2).split(",") if d) if m else ()


@dataclasses.dataclass
class Instr:
  name: str
  shape: str
  opcode: str
  operands: List[str]
  attrs: str
  root: bool = False
  args: str = ""  # the text inside the operand parentheses (a constant's literal)


@dataclasses.dataclass
class Module:
  computations: Dict[str, List[Instr]]
  entry: str

  def instr(self, comp: str) -> Dict[str, Instr]:
    return {i.name: i for i in self.computations[comp]}


def _split_operands(text: str) -> Tuple[List[str], str, str]:
  """'a, b), attrs...' -> (['a', 'b'], 'attrs...') (the operand list ends at the matching
  parenthesis)."""
  depth, i = 1, 0
  while i < len(text) and depth:
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    i += 1
  inner, rest = text[:i - 1], text[i:]
  names = re.findall(r"%([\w.\-]+)", inner)
  return names, rest, inner


def _logical_lines(text: str) -> List[str]:
  """Lines of the module with multi-line instructions (kernel metadata holds newlines) joined."""
  out: List[str] = []
  for line in text.split("\n"):
    starts = (not line.strip() or line.startswith("HloModule") or line == "}" or _HEADER.match(line)
              or re.match(r"^\s+(ROOT\s+)?%?[\w.\-]+\s*=", line))
    if starts or not out:
      out.append(line)
    else:
      out[-1] += " " + line
  return out


def parse_module(text: str) -> Module:
  """The computations of an HLO module's text, each a list of instructions, and the entry's name."""
  comps: Dict[str, List[Instr]] = {}
  entry, current = "", None
  for line in _logical_lines(text):
    if not line.strip() or line.startswith("HloModule"):
      continue
    if line == "}":
      current = None
      continue
    if not line.startswith(" "):
      m = _HEADER.match(line)
      if m:
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if current is None:
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    operands, attrs, args = _split_operands(m.group(5))
    comps[current].append(
        Instr(m.group(2), m.group(3), m.group(4), operands, attrs, bool(m.group(1)), args))
  return Module(comps, entry)


def _attr(attrs: str, key: str) -> Optional[str]:
  m = re.search(rf"\b{key}=%?([\w.\-]+)", attrs)
  return m.group(1) if m else None


def dot_flops(ins: Instr, shapes: Dict[str, str]) -> float:
  """2 x output elements x contracted elements of a dot or convolution."""
  out = 1
  for d in shape_dims(ins.shape):
    out *= d
  if ins.opcode == "dot":
    lhs = shape_dims(shapes.get(ins.operands[0], ""))
    dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
    k = 1
    for d in (dims.group(1).split(",") if dims and dims.group(1) else []):
      k *= lhs[int(d)]
    return 2.0 * out * k
  # convolution: each output element sums over the kernel's input features ('i') and the window taps
  # that
  # land inside the (padded, dilated) input; XLA TPU also encodes batched matmuls as convolutions
  # whose
  # window spans a padded batch dim, where one tap per output is real, so taps are counted, not
  # assumed.
  lhs = shape_dims(shapes.get(ins.operands[0], ""))
  rhs = shape_dims(shapes.get(ins.operands[1], ""))
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
  if not labels or not rhs or not lhs:
    return 0.0
  lhs_l, rhs_l, out_l = labels.groups()
  out_dims = shape_dims(ins.shape)
  k = float(rhs[rhs_l.index("i")])
  window = _window(ins.attrs)
  for i, spec in enumerate(window):
    d = str(i)
    in_size, out_size = lhs[lhs_l.index(d)], out_dims[out_l.index(d)]
    k *= _valid_taps(in_size, out_size, spec) / max(out_size, 1)
  return 2.0 * out * k


def _window(attrs: str) -> List[Dict[str, int]]:
  """Per spatial dim: size, pad_lo, stride, lhs_dilate, rhs_dilate of a convolution's
  `window={...}`."""
  m = re.search(r"window=\{([^}]*)\}", attrs)
  if not m:
    return []
  fields = dict(re.findall(r"(\w+)=([\w_x\-]+)", m.group(1)))
  sizes = [int(v) for v in fields.get("size", "").split("x") if v]
  def per_dim(key, default):
    v = fields.get(key)
    return [default] * len(sizes) if v is None else v.split("x")
  pads = [int(p.split("_")[0]) for p in per_dim("pad", "0_0")]
  strides = [int(v) for v in per_dim("stride", 1)]
  lhs_d = [int(v) for v in per_dim("lhs_dilate", 1)]
  rhs_d = [int(v) for v in per_dim("rhs_dilate", 1)]
  return [dict(size=sz, pad=p, stride=st, lhs_dilate=ld, rhs_dilate=rd)
          for sz, p, st, ld, rd in zip(sizes, pads, strides, lhs_d, rhs_d)]


def _valid_taps(in_size: int, out_size: int, w: Dict[str, int]) -> int:
  """Window taps, summed over the output positions of one spatial dim, that read a real input
  element."""
  total = 0
  for o in range(out_size):
    base = o * w["stride"] - w["pad"]
    if w["lhs_dilate"] == 1:
      d = w["rhs_dilate"]
      lo = -(base //
             d) if base < 0 else 0  # first tap at or past the input's start: ceil(-base / d)
      hi = min(w["size"] - 1, (in_size - 1 - base) // d)
      total += max(0, hi - lo + 1)
    else:
      total += sum(
          1 for j in range(w["size"]) if (base + j * w["rhs_dilate"]) %
          w["lhs_dilate"] == 0 and 0 <= (base + j * w["rhs_dilate"]) // w["lhs_dilate"] < in_size)
  return total


def _fused_ops(module: Module, comp: str, seen=None) -> List[Instr]:
  """Every instruction of a fused computation, nested fusions included."""
  seen = set() if seen is None else seen
  out = []
  for ins in module.computations.get(comp, []):
    out.append(ins)
    called = _attr(ins.attrs, "calls")
    if ins.opcode == "fusion" and called and called not in seen:
      seen.add(called)
      out.extend(_fused_ops(module, called, seen))
  return out


def _fusion_bytes(module: Module, comp: str, ins: Instr, shapes: Dict[str, str]) -> float:
  """Operand + result bytes of a fusion as XLA counts them (sliced operands: the slices; in-place
  updates: the update)."""
  body = module.computations.get(comp, [])
  params = {b.name: b for b in body if b.opcode == "parameter"}
  users = collections.defaultdict(list)
  for b in body:
    for o in b.operands:
      users[o].append(b)
  root = next((b for b in body if b.root), None)
  total = 0.0
  in_place = None
  if root is not None and root.opcode in ("dynamic-update-slice", "scatter") and root.operands:
    in_place = root.operands[0]
    upd = root.operands[1] if root.opcode == "dynamic-update-slice" else root.operands[-1]
    upd_shape = next((b.shape for b in body if b.name == upd), "")
    total += 2 * shape_bytes(upd_shape)  # the update is read, and written into the buffer
  else:
    total += shape_bytes(ins.shape)
  for pname, p in params.items():
    if pname == in_place:
      continue
    us = users.get(pname, [])
    if us and all(
        u.opcode in ("dynamic-slice", "slice", "gather") and u.operands[0] == pname for u in us):
      total += sum(shape_bytes(u.shape) for u in us)
    else:
      total += shape_bytes(p.shape)
  return total


def _const(comp: Dict[str, Instr], name: str, depth: int = 0) -> Optional[int]:
  """The integer value of `name` when it is a constant (through copies / converts / bitcasts)."""
  ins = comp.get(name)
  if ins is None or depth > 8:
    return None
  if ins.opcode == "constant":
    m = re.match(r"\s*(-?\d+)", ins.args)
    return int(m.group(1)) if m else None
  if ins.opcode in ("copy", "convert", "bitcast") and ins.operands:
    return _const(comp, ins.operands[0], depth + 1)
  return None


def _tuple_index(comp: Dict[str, Instr], name: str) -> Optional[int]:
  """i when `name` is get-tuple-element(parameter, index=i) (through converts / copies)."""
  ins = comp.get(name)
  while ins is not None and ins.opcode in ("convert", "copy", "bitcast") and ins.operands:
    ins = comp.get(ins.operands[0])
  if ins is None or ins.opcode != "get-tuple-element":
    return None
  m = re.search(r"index=(\d+)", ins.attrs)
  return int(m.group(1)) if m else None


def trip_count(module: Module, loop: Instr, caller: str) -> int:
  """Iterations of a while loop: its condition compares an induction variable (a tuple element) with
  a constant; the start is that element of the loop's initial tuple, the step what the body adds to
  it. A known trip count in the loop's backend config wins; 1 when neither can be read."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
  if known:
    return int(known.group(1))
  cond = module.instr(_attr(loop.attrs, "condition"))
  root = next((i for i in cond.values() if i.root), None)
  if root is None or root.opcode != "compare" or len(root.operands) != 2:
    return 1
  a, b = root.operands
  bound, index, direction = _const(cond, b), _tuple_index(cond, a), re.search(
      r"direction=(\w+)", root.attrs)
  if bound is None:  # constant on the left: flip
    bound, index = _const(cond, a), _tuple_index(cond, b)
    direction = {
        "GT": "LT",
        "GE": "LE",
        "LT": "GT",
        "LE": "GE"
    }.get(direction.group(1) if direction else "", "")
  else:
    direction = direction.group(1) if direction else ""
  if bound is None or index is None:
    return 1
  start, step = 0, 1
  outer = module.instr(caller)
  init = outer.get(loop.operands[0]) if loop.operands else None
  if init is not None and init.opcode == "tuple" and index < len(init.operands):
    start = _const(outer, init.operands[index]) or 0
  body = module.instr(_attr(loop.attrs, "body"))
  broot = next((i for i in body.values() if i.root), None)
  if broot is not None and broot.opcode == "tuple" and index < len(broot.operands):
    upd = body.get(broot.operands[index])
    if upd is not None and upd.opcode in ("add", "subtract"):
      for o in upd.operands:
        c = _const(body, o)
        if c is not None:
          step = c if upd.opcode == "add" else -c
  if direction in ("LT", "LE", "NE") and step > 0:
    span = bound - start + (1 if direction == "LE" else 0)
    return max(1, -(-span // step))
  if direction in ("GT", "GE") and step < 0:
    span = start - bound + (1 if direction == "GE" else 0)
    return max(1, -(-span // -step))
  return 1


def _is_kernel(ins: Instr) -> bool:
  """A Pallas / Mosaic kernel (on TPU: custom_call_target="tpu_custom_call"); other custom calls are
  XLA's own helpers (buffer allocation, index hints)."""
  target = re.search(r'custom_call_target="([^"]*)"', ins.attrs)
  return bool(target) and target.group(1) in ("tpu_custom_call", "mosaic_gpu",
                                              "__gpu$xla.gpu.triton")


def categorize(module: Module, ins: Instr) -> str:
  op = ins.opcode
  if op == "custom-call":
    return "attention kernel" if _is_kernel(ins) else "other"
  base = op[:-6] if op.endswith("-start") else op[:-5] if op.endswith("-done") else op
  if base in COLLECTIVES:
    return "collective"
  if op in ("dot", "convolution"):
    return "matmul/convolution"
  if op in INDEXING_ROOTS:
    return "gather/scatter"
  if op in ("copy", "transpose", "copy-start", "copy-done"):
    return "copy/transpose"
  if op == "fusion":
    called = _attr(ins.attrs, "calls")
    body = _fused_ops(module, called) if called else []
    ops = {b.opcode for b in body}
    if ops & {"dot", "convolution"}:
      return "matmul/convolution"
    if any(b.opcode == "custom-call" and _is_kernel(b) for b in body):
      return "attention kernel"
    root = next((b for b in module.computations.get(called, []) if b.root), None)
    if (root is not None and root.opcode in INDEXING_ROOTS) or ops & {"gather", "scatter"}:
      return "gather/scatter"
    if ops <= LAYOUT_OPS:
      return "copy/transpose"
    return "elementwise fusion"
  return "elementwise fusion"


@dataclasses.dataclass
class Op:
  name: str
  category: str
  flops: float
  bytes: float
  count: int  # executions (loop trip counts multiplied in)
  shape: str
  op_name: str  # the JAX op that produced it (metadata), for reading
  q_shape: tuple = (
  )  # a kernel call's first float operand of rank >= 3 (splash: q [..., heads, Nq, d])


def _op_name(attrs: str) -> str:
  m = re.search(r'op_name="([^"]*)"', attrs)
  return m.group(1) if m else ""


def ops(module: Module, comp: Optional[str] = None, count: int = 1) -> Iterable[Op]:
  """Every op a run executes, from the entry computation down through while loops (`count` =
  iterations)."""
  comp = comp or module.entry
  body = module.computations[comp]
  shapes = {i.name: i.shape for i in body}
  for ins in body:
    if ins.opcode in FREE_OPS:
      continue
    if ins.opcode == "while":
      n = trip_count(module, ins, comp)
      yield from ops(module, _attr(ins.attrs, "body"), count * n)
      continue
    if ins.opcode == "call":
      yield from ops(module, _attr(ins.attrs, "to_apply"), count)
      continue
    if ins.opcode == "conditional":  # a run takes one branch: the costliest one is counted
      yield from max((list(ops(module, name, count)) for name in _branches(ins)), key=_weight,
                     default=[])
      continue
    if ins.opcode.endswith("-done"):
      continue  # an async pair counts once, at its start
    cat = categorize(module, ins)
    flops = 0.0
    if ins.opcode in ("dot", "convolution"):
      flops = dot_flops(ins, shapes)
      nbytes = shape_bytes(ins.shape) + sum(shape_bytes(shapes.get(o, "")) for o in ins.operands)
    elif ins.opcode == "fusion":
      called = _attr(ins.attrs, "calls")
      inner = _fused_ops(module, called)
      inner_shapes = {b.name: b.shape for b in inner}
      flops = sum(dot_flops(b, inner_shapes) for b in inner if b.opcode in ("dot", "convolution"))
      nbytes = _fusion_bytes(module, called, ins, shapes)
    elif ins.opcode.endswith("-start"):
      result = re.match(r"\((.*)\)", ins.shape)
      nbytes = shape_bytes(ins.shape) / 2 if result else shape_bytes(
          ins.shape)  # (operand, result, ...)
      nbytes = max(nbytes, sum(shape_bytes(shapes.get(o, "")) for o in ins.operands))
    else:
      nbytes = shape_bytes(ins.shape) + sum(shape_bytes(shapes.get(o, "")) for o in ins.operands)
    q_shape = _kernel_q_shape(ins, shapes) if cat == "attention kernel" else ()
    yield Op(ins.name, cat, flops, nbytes, count,
             ins.shape.split("{")[0][:80], _op_name(ins.attrs), q_shape)


def _branches(ins: Instr) -> List[str]:
  m = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
  if m:
    return re.findall(r"%([\w.\-]+)", m.group(1))
  return [
      n for n in (_attr(ins.attrs, "true_computation"), _attr(ins.attrs, "false_computation")) if n
  ]


def _weight(branch: List["Op"]) -> float:
  """A branch's cost for choosing the costliest: bytes plus FLOPs at ~166 FLOPs per byte (a TPU's
  ratio of peak FLOP/s to HBM bytes/s)."""
  return sum((o.bytes + o.flops / 166.0) * o.count for o in branch)


def _kernel_q_shape(ins: Instr, shapes: Dict[str, str]) -> tuple:
  for o in ins.operands:
    m = _ARRAY.search(shapes.get(o, ""))
    if m and m.group(1) in ("bf16", "f32", "f16") and len(shape_dims(m.group(0))) >= 3:
      return shape_dims(m.group(0))
  return ()


@dataclasses.dataclass
class Split:
  """Totals per category over a program's ops (loop trip counts applied)."""
  flops: Dict[str, float]
  bytes: Dict[str, float]
  seconds: Dict[str, float]  # per-op roofline lower bounds, summed
  ops: List[Op]
  loop_extra: Dict[
      str, float]  # flops, bytes, seconds of the loop iterations past the first (XLA counts one)


def split(text: str, peak_flops: float, hbm_bytes_per_s: float, ici_bytes_per_s: float) -> Split:
  """Per-category FLOPs, bytes and roofline seconds of a compiled module's text."""
  module = parse_module(text)
  flops = dict.fromkeys(CATEGORIES, 0.0)
  nbytes = dict.fromkeys(CATEGORIES, 0.0)
  secs = dict.fromkeys(CATEGORIES, 0.0)
  extra = dict(flops=0.0, bytes=0.0, seconds=0.0)
  all_ops = list(ops(module))
  for o in all_ops:
    flops[o.category] += o.flops * o.count
    nbytes[o.category] += o.bytes * o.count
    bw = ici_bytes_per_s if o.category == "collective" else hbm_bytes_per_s
    t = max(o.flops / peak_flops, o.bytes / bw)
    secs[o.category] += t * o.count
    extra["flops"] += o.flops * (o.count - 1)
    extra["bytes"] += o.bytes * (o.count - 1)
    extra["seconds"] += t * (o.count - 1)
  return Split(flops, nbytes, secs, all_ops, extra)
