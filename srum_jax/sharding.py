"""Device mesh and logical-axis sharding rules (MaxText style).

Arrays are annotated with *logical* axis names (`batch`, `embed`, `mlp`, ...); a rule table maps
each logical name to zero or more *mesh* axes (`data`, `fsdp`, `tensor`). Changing the parallelism
of a run is a config change (mesh shape and rules), never a model-code change.

    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    shardings = logical_to_sharding(logical_axes(schema), mesh, DEFAULT_RULES)
    step = jax.jit(train_step, in_shardings=(shardings, batch_sharding), out_shardings=...)
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from srum_jax.models import attention, params as params_lib

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes. Parameters are FSDP-sharded over their `embed` dim and tensor-parallel
# over heads/mlp/vocab; activations shard their batch over data+fsdp. Unlisted names are replicated.
DEFAULT_RULES: Tuple[Tuple[str, Union[None, str, Tuple[str, ...]]], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vit_embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vit_heads", "tensor"),
    ("mlp", "tensor"),
    ("vit_mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    # LoRA adapters: A [in, r] / B [r, out] shard like their kernel's in / out dims
    ("lora_rank", None),
    ("length", None),
    ("norm", None),
    ("channels", None),
)


def make_mesh(shape: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A Mesh with axes ('data', 'fsdp', 'tensor'); one size may be -1 (takes the remaining devices).

  Built directly (not `jax.make_mesh`, whose default Explicit axis types reject pjit-style code).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError("at most one mesh axis may be -1")
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  if free:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide by the fixed mesh axes {sizes}")
    sizes[free[0]] = len(devices) // known
  total = int(np.prod(list(sizes.values())))
  if total != len(devices):
    raise ValueError(f"mesh {sizes} needs {total} devices, {len(devices)} available")
  grid = np.asarray(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
  return Mesh(grid, MESH_AXES)


def logical_to_mesh_spec(logical: Union[PartitionSpec, Sequence[Optional[str]]],
                         rules=DEFAULT_RULES) -> PartitionSpec:
  """PartitionSpec over mesh axes for a tuple of logical names; a mesh axis is used at most once."""
  table = dict(rules)
  used = set()
  out = []
  for name in tuple(logical):
    target = table.get(name) if name is not None else None
    if target is None:
      out.append(None)
      continue
    axes = (target,) if isinstance(target, str) else tuple(target)
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*out)


def _fit(spec: PartitionSpec, shape: Tuple[int, ...], mesh: Mesh) -> PartitionSpec:
  """Drop mesh axes that do not divide the dimension they shard (replicate that dim instead)."""
  fitted = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if entry is None:
      fitted.append(None)
      continue
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    n = int(np.prod([mesh.shape[a] for a in axes]))
    fitted.append(entry if dim % n == 0 else None)
  return PartitionSpec(*fitted)


def logical_to_sharding(logical_tree, mesh: Mesh, rules=DEFAULT_RULES, shapes=None):
  """Map a tree of logical PartitionSpecs to NamedShardings; with `shapes`, non-dividing axes
  replicate."""
  is_leaf = lambda x: isinstance(x, PartitionSpec)
  if shapes is None:
    return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_mesh_spec(s, rules)), logical_tree,
                        is_leaf=is_leaf)
  return jax.tree.map(
      lambda s, x: NamedSharding(mesh, _fit(logical_to_mesh_spec(s, rules), tuple(x.shape), mesh)),
      logical_tree, shapes, is_leaf=is_leaf)


def schema_shardings(schema, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings of every parameter of a schema (`models.params`): its logical axes through
  `rules`, dims a mesh axis does not divide replicated."""
  return logical_to_sharding(
      params_lib.logical_axes(schema), mesh, rules, shapes=params_lib.abstract_params(schema))


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
  """Shard the leading dim of an activation/batch array over the batch mesh axes."""
  return NamedSharding(mesh, logical_to_mesh_spec(("batch",) + (None,) * (ndim - 1), rules))


def under_mesh(fn, mesh: Optional[Mesh]):
  """`fn` traced with `mesh` as the attention kernels' mesh (`models.attention.kernel_mesh`): the
  Pallas / cuDNN kernels, which GSPMD cannot partition, then run per shard of it. For a function
  jitted on `mesh`."""
  if mesh is None:
    return fn

  def traced(*args, **kwargs):
    with attention.kernel_mesh(mesh):
      return fn(*args, **kwargs)
  return traced


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def derive_mesh_shape(shape: Mapping[str, int], num_devices: int, batch_rows: int) -> dict:
  """A mesh shape for `num_devices` from a config's: 'tensor': 0 means "derived": just enough tensor
  parallelism that the remaining devices split `batch_rows` evenly (tensor = devices / gcd(devices,
  rows)), so the global batch can stay the same on any number of devices. Other sizes (one may be
  -1) are kept."""
  sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
  if sizes["tensor"] == 0:
    sizes["tensor"] = num_devices // math.gcd(num_devices, int(batch_rows))
  return sizes


def mesh_from_config(cfg, devices: Optional[Sequence[jax.Device]] = None,
                     batch_rows: int = 1) -> Mesh:
  """`cfg` is a ConfigDict/dict like {'data': -1, 'fsdp': 1, 'tensor': 1} (see `derive_mesh_shape`
  for tensor 0); `batch_rows` is the global batch the derivation divides."""
  devices = list(jax.devices() if devices is None else devices)
  return make_mesh(derive_mesh_shape(dict(cfg), len(devices), batch_rows), devices)


def rules_from_config(cfg) -> Tuple[Tuple[str, Union[None, str, Tuple[str, ...]]], ...]:
  """Config overrides are a list of [logical, mesh_axes] pairs applied over DEFAULT_RULES."""
  table = dict(DEFAULT_RULES)
  for name, target in (cfg or []):
    table[name] = tuple(target) if isinstance(target, (list, tuple)) else target
  return tuple(table.items())
