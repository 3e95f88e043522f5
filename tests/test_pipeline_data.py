"""Training data pipeline: validation counts, packed batches, deterministic order, host sharding, resumable state."""
import json
import os
import zlib

import grain
import numpy as np
import pytest
from PIL import Image

from srum_jax.pipeline import train as train_stage, train_data, train_records
from srum_jax.training import train_step

H, W = 32, 24  # training size (4 x 3 latent tokens on the tiny model)
ORIG = (48, 64)  # (width, height) of most stored images: resized by 1/2


class WordTokenizer:
  """Deterministic fake tokenizer: each word -> an id < 100."""

  def encode(self, text):
    return [zlib.crc32(w.encode()) % 100 for w in text.split()]


def _png(path, color, size=ORIG):
  Image.new("RGB", size, tuple(int(c) for c in color)).save(path)


def _rec(i, image_file, regions=None, g=0.5, prompt=None):
  return {"schema_version": 1, "image_file": image_file, "prompt": prompt or f"a photo number {i}",
          "global_score": g, "regions": regions if regions is not None else
          [{"box": [0, 0, 24, 32], "score": 0.8, "object": "thing"}]}


def _color(i):
  return (10 * i + 5, 200 - 10 * i, 7 * i)


@pytest.fixture()
def dataset_dir(tmp_path):
  """7 usable records (0-5 plain, 6 with bad boxes) and 8 bad lines of every kind."""
  img = tmp_path / "images"
  img.mkdir()
  lines = []
  for i in range(6):
    _png(img / f"{i}.png", _color(i), size=ORIG if i % 2 == 0 else (W, H))
    lines.append(json.dumps(_rec(i, f"{i}.png")))
  _png(img / "6.png", _color(6))
  lines.append(json.dumps(_rec(6, "6.png", regions=[
      {"box": [10, 10, 5, 20], "score": 0.9},  # x_min >= x_max: dropped
      {"box": [100, 100, 200, 200], "score": 0.9},  # outside the 48 x 64 image: dropped
      {"box": [-5, 10, 30, 70], "score": -0.5},  # clamped to [0, 10, 30, 64]
      {"box": [2, 4, 10, 12], "score": 1.0}])))  # kept as is
  lines.append(json.dumps(_rec(7, "7.png")).replace('"score": 0.8', '"score": NaN'))  # non-finite
  lines.append('{"schema_version": 1, "image_file": "8.png", "prompt": ')  # truncated JSON
  lines.append(json.dumps(_rec(9, "9.png", g=1.5)))  # score outside [-1, 1]
  lines.append(json.dumps(_rec(10, "missing.png")))
  (img / "11.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))  # corrupt
  _png(img / "12.png", _color(12))
  full = (img / "12.png").read_bytes()
  (img / "12.png").write_bytes(full[:len(full) // 2])  # truncated PNG
  lines.append(json.dumps(_rec(11, "11.png")))
  lines.append(json.dumps(_rec(12, "12.png")))
  lines.append(json.dumps(_rec(13, "0.png", g=0.0)))  # dropped by the official formatting filter
  path = tmp_path / "records.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return tmp_path


def _spec(rows=2, S=2, text_capacity=2 * 10, max_regions=3):
  return train_data.DataSpec(image_hw=(H, W), rows=rows, samples_per_row=S, num_tokens=S * 12 + text_capacity,
                       text_capacity=text_capacity, max_regions=max_regions)


def _prepare(d, **kw):
  return train_records.prepare_records(str(d / "records.jsonl"), str(d / "images"), str(d / "cache"), max_regions=3, **kw)


def _iter(d, tiny_cfg, path, seed=0, process=(0, 1), spec=None, report=None):
  ds = train_data.make_dataset(path, str(d / "images"), spec or _spec(), cfg=tiny_cfg, tokenizer=WordTokenizer(),
                         seed=seed, process_index=process[0], process_count=process[1], read_threads=2,
                         report=report)
  return iter(ds)


def test_validation_counts_bad_input(dataset_dir, tiny_cfg):
  path, rep = _prepare(dataset_dir)
  assert (rep.lines, rep.kept) == (14, 7)
  assert rep.nonfinite == 1 and rep.malformed == 2
  assert rep.missing_image == 1 and rep.corrupt_image == 2
  assert rep.filtered_zero_global == 1 and rep.skipped == 7
  assert (rep.boxes_degenerate, rep.boxes_outside, rep.boxes_clamped) == (1, 1, 1)
  assert os.path.basename(path).startswith("records-7-")
  assert len(grain.sources.ArrayRecordDataSource(path)) == 7
  # the pipeline runs on what is left; record 6's sanitised boxes are scaled 48x64 -> 24x32 (x 1/2)
  seen = {}
  it = _iter(dataset_dir, tiny_cfg, path)
  for _ in range(4):
    hb = next(it)
    b = hb.batch
    for r in range(2):
      for s in range(2):
        seen[int(hb.indices[r, s])] = (b.rewards.boxes[r, s], b.rewards.valid[r, s], b.rewards.scores[r, s])
  boxes, valid, scores = seen[6]
  np.testing.assert_array_equal(valid, [True, True, False])
  np.testing.assert_allclose(boxes[:2], [[0, 5, 15, 32], [1, 2, 5, 6]])
  np.testing.assert_allclose(scores[:2], [-0.5, 1.0])
  assert sorted(seen) == list(range(7))


def test_cache_reused_and_rebuilt(dataset_dir):
  p1, _ = _prepare(dataset_dir)
  mtime = os.path.getmtime(p1)
  p2, rep2 = _prepare(dataset_dir)
  assert p2 == p1 and os.path.getmtime(p2) == mtime and rep2.kept == 7 and rep2.corrupt_image == 2
  with open(dataset_dir / "records.jsonl", "a") as f:
    f.write(json.dumps(_rec(20, "1.png")) + "\n")
  p3, rep3 = _prepare(dataset_dir)
  assert p3 != p1 and rep3.kept == 8 and os.path.basename(p3).startswith("records-8-")
  _png(dataset_dir / "images" / "1.png", (1, 2, 3), size=(W + 2, H))  # an image changed: rebuild too
  os.utime(dataset_dir / "images" / "1.png", ns=(1, 1))
  p4, _ = _prepare(dataset_dir)
  assert p4 != p3


def test_batch_contents(dataset_dir, tiny_cfg):
  path, _ = _prepare(dataset_dir)
  hb = next(_iter(dataset_dir, tiny_cfg, path))
  b = hb.batch
  assert b.images.shape == (2, 2, H, W, 3) and b.images.dtype == np.float32
  assert b.inputs.latent_index.shape == (2, 2 * 12)
  assert b.rewards.boxes.shape == (2, 2, 3, 4) and b.rewards.global_scores.shape == (2, 2)
  for r in range(2):
    for s in range(2):
      i = int(hb.indices[r, s])
      # solid colours survive the bicubic resize exactly; (x/255 - 0.5)/0.5
      want = (np.array(_color(i), np.float32) / 255 - 0.5) / 0.5
      np.testing.assert_allclose(b.images[r, s], np.broadcast_to(want, (H, W, 3)), atol=1e-6)
      assert hb.prompts[2 * r + s] == f"a photo number {i}"
  ids = b.inputs.text_ids[0]
  assert ids[0] == tiny_cfg.tokens.bos and tiny_cfg.tokens.eos in ids.tolist()
  assert hb.truncated == 0
  # one window per sample, the one the train stage's step attends within
  spec = _spec()
  T = train_step.sample_window(spec.num_tokens, spec.samples_per_row)
  assert T > 0
  sid = b.inputs.meta.sample_id.reshape(2, 2, T)
  for r in range(2):
    for s in range(2):
      assert set(sid[r, s].tolist()) - {-1} == {2 * r + s}


def test_long_prompts_truncated_and_counted(tmp_path, tiny_cfg):
  img = tmp_path / "images"
  img.mkdir()
  lines = []
  for i in range(4):
    _png(img / f"{i}.png", _color(i))
    words = " ".join(f"w{k}" for k in range(3 + 10 * (i % 2)))  # 3 or 13 words; budget 10 - 4 = 6
    lines.append(json.dumps(_rec(i, f"{i}.png", prompt=words)))
  (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
  path, _ = train_records.prepare_records(str(tmp_path / "records.jsonl"), str(img), str(tmp_path / "c"), max_regions=3)
  spec = _spec(rows=2, S=2, text_capacity=20)
  assert train_data.text_budget(tiny_cfg, spec) == 6
  hb = next(_iter(tmp_path, tiny_cfg, path, spec=spec))
  assert hb.truncated == 2
  # every row's text stays inside its capacity: 2 samples x (BOS + <=6 ids + EOS + 2 markers)
  assert int((hb.batch.inputs.text_index < spec.num_tokens).sum(axis=1).max()) <= 20


def _indices(it, n):
  return [int(i) for _ in range(n) for i in next(it).indices.reshape(-1)]


def test_deterministic_order_and_epochs(dataset_dir, tiny_cfg):
  path, _ = _prepare(dataset_dir)
  a = _indices(_iter(dataset_dir, tiny_cfg, path, seed=3), 7)  # 28 samples = 4 epochs of 7
  b = _indices(_iter(dataset_dir, tiny_cfg, path, seed=3), 7)
  c = _indices(_iter(dataset_dir, tiny_cfg, path, seed=4), 7)
  assert a == b and a != c
  epochs = [a[k:k + 7] for k in range(0, 28, 7)]
  assert all(sorted(e) == list(range(7)) for e in epochs)
  assert len({tuple(e) for e in epochs}) > 1  # reshuffled every epoch


def test_processes_cut_the_same_global_batches(dataset_dir, tiny_cfg):
  """Two processes of one row each read the two halves of the global batches one process of two rows reads:
  the global batch does not depend on the process count."""
  path, _ = _prepare(dataset_dir)
  one = _iter(dataset_dir, tiny_cfg, path, seed=1, spec=_spec(rows=2, S=1))
  halves = [_iter(dataset_dir, tiny_cfg, path, seed=1, process=(k, 2), spec=_spec(rows=1, S=1)) for k in range(2)]
  for _ in range(6):  # more than one epoch of 7 records
    whole = next(one).indices.reshape(-1).tolist()
    parts = [next(h).indices.reshape(-1).tolist() for h in halves]
    assert parts[0] + parts[1] == whole


def test_iterator_state_round_trip(dataset_dir, tiny_cfg):
  path, _ = _prepare(dataset_dir)
  it = _iter(dataset_dir, tiny_cfg, path, seed=2)
  for _ in range(2):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  want = [next(it) for _ in range(3)]
  it2 = _iter(dataset_dir, tiny_cfg, path, seed=2)
  it2.set_state(state)
  got = [next(it2) for _ in range(3)]
  for w, g in zip(want, got):
    np.testing.assert_array_equal(w.indices, g.indices)
    np.testing.assert_array_equal(w.batch.images, g.batch.images)
    np.testing.assert_array_equal(w.batch.inputs.text_ids, g.batch.inputs.text_ids)
  fresh = _iter(dataset_dir, tiny_cfg, path, seed=2)
  assert [w.indices.tolist() for w in want] != [next(fresh).indices.tolist() for _ in range(3)]


def test_decode_failure_while_iterating_is_counted(dataset_dir, tiny_cfg):
  path, _ = _prepare(dataset_dir)
  os.remove(dataset_dir / "images" / "3.png")  # vanished after validation
  rep = train_records.DataReport()
  idx = _indices(_iter(dataset_dir, tiny_cfg, path, seed=0, report=rep), 3)
  assert 3 not in idx and len(idx) == 12 and rep.decode_failures >= 1


def test_every_image_gone_after_validation_stops_with_a_clear_error(dataset_dir, tiny_cfg):
  """The filter would drop every record forever: the iterator raises instead of spinning."""
  import time
  path, rep = _prepare(dataset_dir)
  assert rep.kept == 7
  for f in (dataset_dir / "images").glob("*.png"):
    f.unlink()
  t0 = time.time()
  with pytest.raises(train_data.NoUsableRecords, match="failed to load"):
    next(_iter(dataset_dir, tiny_cfg, path, seed=0))
  assert time.time() - t0 < 30


def test_duplicate_ids_keep_one_record(tmp_path):
  """Two score runs appending to one records file (before the workdir lock): one record per item id."""
  img = tmp_path / "images"
  img.mkdir()
  lines = []
  for i in range(3):
    _png(img / f"{i}.png", _color(i))
    lines.append(json.dumps(dict(_rec(i, f"{i}.png"), metadata={"id": f"item{i}"}, id=f"item{i}")))
  lines += [json.dumps(dict(_rec(9, "0.png", g=-0.5), metadata={"id": "item0"}, id="item0"))]  # a second row
  (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
  good, rep = train_records.validate_records(str(tmp_path / "records.jsonl"), str(img), max_regions=3)
  assert rep.duplicate_id == 1 and rep.kept == 3 == len(good) and rep.lines == rep.kept + rep.skipped
  assert [g["global_score"] for g in good] == [0.5, 0.5, 0.5]  # the first row of item0 is kept


def _pool_encode(calls):
  """A stand-in encoder: 8x8 mean pool, then [mean, -mean] channels (moments-shaped [b, H/8, W/8, 6])."""
  def encode(x):
    calls.append(len(x))
    m = x.reshape(x.shape[0], H // 8, 8, W // 8, 8, 3).mean(axis=(2, 4))
    return np.concatenate([m, -m], axis=-1)
  return encode


def _want_moments(i):
  v = (np.array(_color(i), np.float32) / 255 - 0.5) / 0.5
  return np.broadcast_to(np.concatenate([v, -v]), (H // 8, W // 8, 6))


@pytest.mark.parametrize("process_count", [1, 2])
def test_stored_moments_replace_images(dataset_dir, tiny_cfg, process_count):
  """Moments encoded once (by each of `process_count` processes for its share) stand in for the images: same
  records in the same order, each record's moments, resumable, reused without encoding again."""
  path, _ = _prepare(dataset_dir)
  calls = []
  files = [train_data.prepare_moments(path, str(dataset_dir / "images"), (H, W), _pool_encode(calls), encoder_id="pool",
                                batch_size=3, process_index=p, process_count=process_count)
           for p in range(process_count)]
  assert files[0] == files[-1] and len(files[0].parts) == process_count and sum(calls) == 7
  n_calls = len(calls)
  again = train_data.prepare_moments(path, str(dataset_dir / "images"), (H, W), _pool_encode(calls), encoder_id="pool",
                               batch_size=3, process_index=0, process_count=process_count)
  assert again == files[0] and len(calls) == n_calls  # reused

  def it(**kw):
    return iter(train_data.make_dataset(path, str(dataset_dir / "images"), _spec(), cfg=tiny_cfg, tokenizer=WordTokenizer(),
                                  seed=5, read_threads=2, **kw))
  with_images, with_moments = it(), it(moments=files[0])
  for _ in range(4):  # past one epoch of 7
    a, b = next(with_images), next(with_moments)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.batch.rewards.boxes, b.batch.rewards.boxes)
    np.testing.assert_array_equal(a.batch.inputs.text_ids, b.batch.inputs.text_ids)
    assert b.batch.images is None and b.batch.moments.shape == (2, 2, H // 8, W // 8, 6)
    assert b.image_files == [f"{int(i)}.png" for i in b.indices.reshape(-1)]
    for r in range(2):
      for s in range(2):
        np.testing.assert_allclose(b.batch.moments[r, s], _want_moments(int(b.indices[r, s])), atol=1e-6)
  state = json.loads(json.dumps(with_moments.get_state()))
  want = [next(with_moments) for _ in range(2)]
  resumed = it(moments=files[0])
  resumed.set_state(state)
  for w in want:
    g = next(resumed)
    np.testing.assert_array_equal(w.indices, g.indices)
    np.testing.assert_array_equal(w.batch.moments, g.batch.moments)


def test_stored_moments_bf16_and_unloadable_images(dataset_dir, tiny_cfg):
  path, _ = _prepare(dataset_dir)
  os.remove(dataset_dir / "images" / "3.png")  # vanished after validation: no moments, counted when reached
  files = train_data.prepare_moments(path, str(dataset_dir / "images"), (H, W), _pool_encode([]), encoder_id="pool",
                               dtype="bfloat16")
  rep = train_records.DataReport()
  ds = train_data.make_dataset(path, str(dataset_dir / "images"), _spec(), cfg=tiny_cfg, tokenizer=WordTokenizer(), seed=0,
                         read_threads=2, report=rep, moments=files)
  seen = []
  it = iter(ds)
  for _ in range(3):
    hb = next(it)
    assert str(hb.batch.moments.dtype) == "bfloat16"
    for r in range(2):
      for s in range(2):
        i = int(hb.indices[r, s])
        seen.append(i)
        np.testing.assert_allclose(hb.batch.moments[r, s].astype(np.float32), _want_moments(i), rtol=1e-2, atol=1e-2)
  assert 3 not in seen and len(seen) == 12 and rep.decode_failures >= 1
  with pytest.raises(ValueError, match="moments dtype"):
    train_data.prepare_moments(path, str(dataset_dir / "images"), (H, W), _pool_encode([]), encoder_id="pool", dtype="fp8")


def test_anchor_prompts_ride_along_deterministic_per_row(dataset_dir, tiny_cfg):
  """Each sample gets an anchor prompt drawn from (seed, its row's record indices): the same for one
  and two processes, reshuffled with the epochs; the anchor layout keeps the candidates' latent
  slots."""
  path, _ = _prepare(dataset_dir)
  prompts = [f"anchor prompt {k}" for k in range(50)]
  ids = train_stage.anchor_prompt_ids(prompts, tiny_cfg, _spec(rows=2, S=1), WordTokenizer())
  assert ids[0][0] == tiny_cfg.tokens.bos and ids[0][-1] == tiny_cfg.tokens.eos and len(ids[0]) == 5

  def make(rows, process):
    return iter(train_data.make_dataset(path, str(dataset_dir / "images"), _spec(rows=rows, S=1),
                                        cfg=tiny_cfg, tokenizer=WordTokenizer(), seed=1,
                                        process_index=process[0], process_count=process[1],
                                        read_threads=2, anchor_ids=ids))
  one, halves = make(2, (0, 1)), [make(1, (k, 2)) for k in range(2)]
  seen = []
  for _ in range(6):
    b = next(one).batch
    a = b.anchor_inputs
    # the sample each latent slot belongs to
    owner = lambda x: np.take_along_axis(  # noqa: E731
        x.meta.sample_id, np.minimum(x.latent_index, x.meta.sample_id.shape[1] - 1), axis=1)
    np.testing.assert_array_equal(owner(a), owner(b.inputs))
    texts = a.text_ids.tolist()
    assert texts != b.inputs.text_ids.tolist()
    two = [next(h).batch.anchor_inputs.text_ids[0].tolist() for h in halves]
    assert two == texts  # same with 2 processes
    seen += [tuple(t) for t in texts]
  assert len(set(seen)) > 3  # draws vary over batches and epochs
  plain = next(_iter(dataset_dir, tiny_cfg, path))
  assert plain.batch.anchor_inputs is None
