"""Sharded inference on 8 simulated devices equals one device: the sampler (think mode, CFG) and the judge
(logits and generate modes) with the parameters sharded over fsdp x tensor by the logical-axis rules and the
rows over data x fsdp; and a sharded model holds ~1/ways of its parameters per device.

Tolerances (fp32, matmul precision highest): latents atol 1e-4 (sums reordered by the sharded matmuls;
measured ~1e-6), uint8 pixels +-1, judge expected scores atol 1e-5, decoded text identical.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srum_jax import defaults, sharding
from srum_jax.engine import loaded_model
from srum_jax.engine.judge import Judge, JudgeOptions
from srum_jax.inference import sampling
from srum_jax.models import params as params_lib
from srum_jax.models.config import get_preset
from srum_jax.rewards.texts import own_texts

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow circle", "three red squares"]
MESH = {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.fixture(scope="module")
def models(tiny_model_dir):
  one = loaded_model.load_model(tiny_model_dir)
  mesh = sharding.make_mesh(MESH)
  return one, loaded_model.load_model(tiny_model_dir, mesh=mesh)


def test_parameters_are_sharded_by_the_rules(models):
  one, sharded = models
  q = sharded.params["bagel"]["llm"]["layers"]["und"]["q_proj"]["kernel"]  # [layers, embed, heads]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 2)
  emb = sharded.params["bagel"]["llm"]["embed_tokens"]["embedding"]
  assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


@pytest.mark.slow
def test_sharded_sampler_equals_one_device(models):
  """think mode (plan decoded, then the image) with text CFG: the same plans, latents and pixels."""
  one, sharded = models
  kw = dict(cfg=one.cfg, seeds=3, image_ids=list(range(4)), height=32, width=32, num_timesteps=3,
            cfg_text_scale=2.0, think=True, max_think_tokens=4,
            system_prompt=own_texts().gen_think_system)
  a = sampling.text_to_image(one.params["bagel"], one.params["ae"], one.tokenizer, PROMPTS, **kw)
  b = sampling.text_to_image(sharded.params["bagel"], sharded.params["ae"], sharded.tokenizer, PROMPTS,
                             mesh=loaded_model.batch_rows_mesh(sharded, 4), **kw)
  assert a.think_texts == b.think_texts
  np.testing.assert_allclose(np.asarray(b.latents), np.asarray(a.latents), atol=1e-4)
  assert np.abs(a.images.astype(int) - b.images.astype(int)).max() <= 1


@pytest.mark.slow
def test_sharded_judge_equals_one_device(models):
  """logits mode (expected scores) and generate mode (decoded answers); five rows do not divide the mesh's
  four batch shards: the judge pads them."""
  one, sharded = models
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(5)]
  texts = PROMPTS + ["a blue circle"]
  scfg = defaults.base_config().score
  scfg.update(dict(mode="logits", think=False, vit_image_size=28, max_new_tokens_global=6, max_retries=0))
  got = []
  for model in (one, sharded):
    judge = Judge(JudgeOptions.from_config(scfg), model, texts=own_texts())
    got.append((judge.global_scores(images, texts), judge.answers(images, texts, 6)))
  np.testing.assert_allclose(got[0][0], got[1][0], atol=1e-5)
  assert got[0][1] == got[1][1] and len(got[1][1]) == 5


def _bytes_per_device(tree) -> int:
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_per_device_parameter_bytes_are_total_over_ways():
  """BAGEL-7B's parameters placed by the rules: fsdp 8 or tensor 4 hold ~1/8 or ~1/4 per device (replicated:
  leaves without a sharded axis, mostly the 84M-parameter autoencoder, norms and biases)."""
  cfg = get_preset("bagel_7b_mot")
  schema = params_lib.model_schema(cfg)
  abstract = params_lib.abstract_params(schema, jnp.bfloat16)
  total = sum(int(np.prod(x.shape)) * 2 for x in jax.tree.leaves(abstract))
  for shape, ways in (({"fsdp": 8}, 8), ({"data": 2, "tensor": 4}, 4)):
    mesh = sharding.make_mesh(shape)
    sh = sharding.schema_shardings(schema, mesh)
    placed = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sh)
    per_device = _bytes_per_device(placed)
    assert total / ways <= per_device <= 1.06 * total / ways, (shape, per_device / (total / ways))
