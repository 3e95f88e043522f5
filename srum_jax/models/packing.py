"""Static-shape packing of variable-length samples and BAGEL's attention-mask rule
(docs/bagel.md, "Packed sequence layout and attention mask").

A batch is `B` rows of `N` token slots. Each row holds one or more samples back to back, followed by
padding. Every slot carries metadata (`TokenMeta`); the mask between any query and key set is a pure
function of the two metadata sets, so the same rule serves training (queries = keys = the packed
row), the KV-cache prefill/decoding path (keys = cache ++ new tokens) and the image-generation query
block.

Sample layout: a sample is a list of splits.
* `text`: the caller's tokens (including BOS/EOS), mode causal, consecutive positions.
* `vit`, `vae_clean`: `<|vision_start|>` + tokens + `<|vision_end|>`, mode full, one shared position,
  the position counter advances by 1 afterwards.
* `vae_noise`: same shape, mode noise, one shared position, the counter does not advance.
Positions restart at 0 for every sample. Latent tokens go to the gen expert; text tokens, the two
markers and ViT tokens go to the und expert.

Rows are packed on the host with NumPy (`pack`); identical budgets give identical shapes, so
changing the content never recompiles a jitted step.
"""
from __future__ import annotations

import dataclasses
from typing import List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

CAUSAL, FULL, NOISE = 0, 1, 2
SPLIT_KINDS = ("text", "vit", "vae_clean", "vae_noise")


class TokenMeta(NamedTuple):
  """Per-slot metadata, every field [B, N].

  sample_id: int32, -1 for padding (attends to nothing, seen by nothing).
  split_id: int32, increasing along a row.
  mode: int32, CAUSAL / FULL / NOISE.
  index: int32, order for in-split causality (slot index in the row, or in the KV cache).
  position: int32, RoPE position id.
  is_gen: bool, True for latent tokens (gen expert).
  """
  sample_id: jax.Array
  split_id: jax.Array
  mode: jax.Array
  index: jax.Array
  position: jax.Array
  is_gen: jax.Array


def attention_mask(q: TokenMeta, k: TokenMeta) -> jax.Array:
  """bool [B, Nq, Nk]: may query i attend key j?

  Same (non-padding) sample, and either the key's split is earlier and not a noise split, or both
  are in the same split and the query split is not causal or the key does not come after the query.
  """
  qs, ks = q.sample_id[:, :, None], k.sample_id[:, None, :]
  same_sample = (qs == ks) & (qs >= 0) & (ks >= 0)
  q_split, k_split = q.split_id[:, :, None], k.split_id[:, None, :]
  earlier = (k_split < q_split) & (k.mode[:, None, :] != NOISE)
  in_split = (k_split == q_split) & ((q.mode[:, :, None] != CAUSAL) | (k.index[:, None, :] <= q.index[:, :, None]))
  return same_sample & (earlier | in_split)


def valid(meta: TokenMeta) -> jax.Array:
  """bool [B, N]: slot holds a real token."""
  return meta.sample_id >= 0


def padding_meta(batch: int, num_tokens: int) -> TokenMeta:
  """All-padding metadata (NumPy), e.g. for an empty KV cache."""
  z = np.zeros((batch, num_tokens), np.int32)
  return TokenMeta(sample_id=np.full_like(z, -1), split_id=z.copy(), mode=z.copy(),
                   index=np.broadcast_to(np.arange(num_tokens, dtype=np.int32), z.shape).copy(),
                   position=z.copy(), is_gen=np.zeros(z.shape, bool))


# ----------------------------------------------------------------------------------------------
# Host-side builder


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a sample. `length`: text tokens (BOS/EOS included) or image tokens (markers
  excluded).

  `ids` (text only, optional) are the token ids; when every text split has ids and the marker ids
  are given to `pack`, the packed text ids are returned too.
  """
  kind: str
  length: int
  ids: Optional[Sequence[int]] = None

  def __post_init__(self):
    if self.kind not in SPLIT_KINDS:
      raise ValueError(f"unknown split kind {self.kind!r}; choose one of {SPLIT_KINDS}")
    if self.ids is not None and (self.kind != "text" or len(self.ids) != self.length):
      raise ValueError(f"ids are for text splits and must have `length` entries: {self}")
    if self.length < (1 if self.kind == "text" else 0):
      raise ValueError(f"bad split length: {self}")

  @property
  def num_slots(self) -> int:
    return self.length if self.kind == "text" else self.length + 2


def text(ids_or_length) -> Split:
  if isinstance(ids_or_length, (int, np.integer)):
    return Split("text", int(ids_or_length))
  ids = [int(i) for i in ids_or_length]
  return Split("text", len(ids), ids)


Sample = Sequence[Split]


def sample_length(sample: Sample) -> int:
  return sum(s.num_slots for s in sample)


@dataclasses.dataclass
class Packed:
  """Result of `pack` (NumPy arrays).

  meta: TokenMeta of [B, N] arrays.
  {text,vit,latent}_index [B, C]: slots (in row order) of text-embedded tokens (text splits and
  image
    markers), ViT tokens and latent tokens; unused entries hold the fill index N (out of range:
    gathers with mode="fill" give 0 and scatters with mode="drop" skip them). {..}_valid [B, C] says
    which are real.
  {vit,latent}_image [B, C]: which image (counted over the batch in input order, per kind: vit
  images,
    latent images) each token belongs to, -1 unused; {vit,latent}_offset [B, C]: token number inside
    it.
  text_ids [B, Ct] int32 or None (see `Split.ids`), 0 where unused.
  num_und / num_gen [B]: routed token counts per row (for choosing MoT capacities).
  """
  meta: TokenMeta
  text_index: np.ndarray
  text_valid: np.ndarray
  vit_index: np.ndarray
  vit_valid: np.ndarray
  vit_image: np.ndarray
  vit_offset: np.ndarray
  latent_index: np.ndarray
  latent_valid: np.ndarray
  latent_image: np.ndarray
  latent_offset: np.ndarray
  text_ids: Optional[np.ndarray]
  num_und: np.ndarray
  num_gen: np.ndarray


def first_fit(samples: Sequence[Sample], num_rows: int, num_tokens: int) -> List[List[Sample]]:
  """Assign samples (in order) to the first row with room; raises if one does not fit anywhere."""
  rows: List[List[Sample]] = [[] for _ in range(num_rows)]
  used = [0] * num_rows
  for i, s in enumerate(samples):
    n = sample_length(s)
    for r in range(num_rows):
      if used[r] + n <= num_tokens:
        rows[r].append(s)
        used[r] += n
        break
    else:
      raise ValueError(
          f"sample {i} ({n} tokens) fits in none of {num_rows} rows of {num_tokens} tokens "
          f"(used {used})")
  return rows


def _check_row(b: int, row: Sequence[Sample], num_tokens: int, caps: dict) -> None:
  """Raise unless row b fits the token budget and every kind's capacity (an image brings its two
  markers)."""
  need = sum(sample_length(s) for s in row)
  if need > num_tokens:
    raise ValueError(f"row {b} needs {need} tokens but the budget is N={num_tokens}")
  counts = {"text": 0, "vit": 0, "latent": 0}
  for smp in row:
    for s in smp:
      if s.kind == "text":
        counts["text"] += s.length
      else:
        counts["text"] += 2
        counts["vit" if s.kind == "vit" else "latent"] += s.length
  for k, c in counts.items():
    if c > caps[k]:
      raise ValueError(f"row {b} has {c} {k} tokens but {k}_capacity is {caps[k]}")


def _check_windows(b: int, row: Sequence[Sample], num_tokens: int, stride: int) -> None:
  """Raise unless every sample of row b fits a window of `stride` slots and the windows fit the
  row."""
  if len(row) * stride > num_tokens:
    raise ValueError(f"row {b}: {len(row)} windows of {stride} slots exceed N={num_tokens}")
  for k, smp in enumerate(row):
    if sample_length(smp) > stride:
      raise ValueError(
          f"row {b}, sample {k}: {sample_length(smp)} tokens do not fit its {stride}-slot window")


def pack(rows: Sequence[Sequence[Sample]], num_tokens: int, *, text_capacity: int,
         vit_capacity: int = 0, latent_capacity: int = 0, start_of_image: Optional[int] = None,
         end_of_image: Optional[int] = None, sample_stride: int = 0) -> Packed:
  """Pack rows of samples into [B, N] metadata and index arrays (B = len(rows), N = num_tokens).

  Sample ids are numbered over the batch in input order, split ids increase along each row.
  `sample_stride` > 0: the k-th sample of a row starts at slot k * sample_stride (padding between
  samples), so every sample lies in its own window of the row and attention can run per window
  (`attention.attention(window=)`); 0: samples back to back.
  Raises ValueError when a row exceeds `num_tokens`, a token kind exceeds its capacity, or a sample
  does not fit its window.
  """
  B, N = len(rows), num_tokens
  meta = padding_meta(B, N)
  caps = {"text": text_capacity, "vit": vit_capacity, "latent": latent_capacity}
  idx = {k: np.full((B, c), N, np.int32) for k, c in caps.items()}
  image = {k: np.full((B, caps[k]), -1, np.int32) for k in ("vit", "latent")}
  offset = {k: np.zeros((B, caps[k]), np.int32) for k in ("vit", "latent")}
  fill = {k: np.zeros(B, np.int64) for k in caps}
  all_text = (
      start_of_image is not None and end_of_image is not None and
      all(s.ids is not None for row in rows for smp in row for s in smp if s.kind == "text"))
  text_ids = np.zeros((B, text_capacity), np.int32) if all_text else None
  n_images = {"vit": 0, "latent": 0}
  sample_id = 0

  def put(b, kind, start, n, tid=None):
    """Record slots start..start+n-1 of row b as the next `n` entries of its `kind` index."""
    j = fill[kind][b]
    idx[kind][b, j:j + n] = np.arange(start, start + n)
    if text_ids is not None and tid is not None:
      text_ids[b, j:j + n] = tid
    fill[kind][b] += n
    return j

  for b, row in enumerate(rows):
    _check_row(b, row, N, caps)
    if sample_stride:
      _check_windows(b, row, N, sample_stride)
    t, split = 0, 0

    for k, smp in enumerate(row):
      t = k * sample_stride if sample_stride else t
      pos = 0
      for s in smp:
        sl = slice(t, t + s.num_slots)
        meta.sample_id[b, sl] = sample_id
        meta.split_id[b, sl] = split
        if s.kind == "text":
          meta.mode[b, sl] = CAUSAL
          meta.position[b, sl] = np.arange(pos, pos + s.length)
          put(b, "text", t, s.length, s.ids)
          pos += s.length
        else:  # <|vision_start|> at t, image tokens at t+1 .. t+L, <|vision_end|> at t+L+1
          kind = "vit" if s.kind == "vit" else "latent"
          meta.mode[b, sl] = NOISE if s.kind == "vae_noise" else FULL
          meta.position[b, sl] = pos
          meta.is_gen[b, t + 1:t + 1 + s.length] = kind == "latent"
          put(b, "text", t, 1, start_of_image)
          j = put(b, kind, t + 1, s.length)
          put(b, "text", t + 1 + s.length, 1, end_of_image)
          image[kind][b, j:j + s.length] = n_images[kind]
          offset[kind][b, j:j + s.length] = np.arange(s.length)
          n_images[kind] += 1
          if s.kind != "vae_noise":
            pos += 1
        t += s.num_slots
        split += 1
      sample_id += 1

  valid_of = {k: np.arange(caps[k])[None, :] < fill[k][:, None] for k in caps}
  num_gen = meta.is_gen.sum(1).astype(np.int32)
  num_und = ((meta.sample_id >= 0).sum(1) - num_gen).astype(np.int32)
  return Packed(meta=meta, text_index=idx["text"], text_valid=valid_of["text"],
                vit_index=idx["vit"], vit_valid=valid_of["vit"], vit_image=image["vit"],
                vit_offset=offset["vit"], latent_index=idx["latent"],
                latent_valid=valid_of["latent"], latent_image=image["latent"],
                latent_offset=offset["latent"], text_ids=text_ids, num_und=num_und, num_gen=num_gen)


def to_device(meta: TokenMeta) -> TokenMeta:
  return TokenMeta(*(jnp.asarray(x) for x in meta))
