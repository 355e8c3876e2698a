"""Optimizers and schedules by name: schedules against their formulas, weight decay by rule, each
optimizer's first update against its definition or optax called directly, Muon's matrix shapes."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax import contrib

from lmjax import model, train
from lmjax.run import config as config_lib
from lmjax.train import optimizer as optimizer_lib

from conftest import tiny_config

# Jitted: flax's init traced once instead of run op by op (seconds for these shapes).
init_params = jax.jit(model.init_params, static_argnums=0)


def optim(**values):
  cfg = config_lib.base_config().optim
  cfg.update(values)
  return cfg


def expected_lr(schedule, t, lr=1.0, min_lr=0.1, warmup=10, horizon=110, fraction=0.2, shape="sqrt"):
  """The schedules' definitions (train/schedules.py's docstring), written out."""
  if t < warmup:
    return lr * t / warmup
  if schedule == "constant":
    return lr
  if schedule == "inverse_sqrt":
    return lr * math.sqrt(warmup / t)
  if t >= horizon:
    return min_lr
  if schedule == "cosine":
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (t - warmup) / (horizon - warmup)))
  decay = round(fraction * horizon)  # wsd: the last 22 of 110 steps
  f = max(0.0, (t - (horizon - decay)) / decay)
  kept = {"linear": 1 - f, "cosine": 0.5 * (1 + math.cos(math.pi * f)), "sqrt": 1 - math.sqrt(f)}[shape]
  return min_lr + (lr - min_lr) * kept


@pytest.mark.parametrize(
  "schedule, shape",
  [
    ("cosine", None),
    ("wsd", "linear"),
    ("wsd", "cosine"),
    ("wsd", "sqrt"),
    ("constant", None),
    ("inverse_sqrt", None),
  ],
)
def test_schedules_match_their_formulas(schedule, shape):
  cfg = optim(lr=1.0, min_lr=0.1, warmup_steps=10, schedule=schedule, decay_shape=shape or "sqrt")
  fn = train.make_schedule(cfg, 110)
  for t in (0, 5, 10, 11, 35, 60, 87, 88, 89, 95, 100, 109, 110, 200):
    assert float(fn(t)) == pytest.approx(expected_lr(schedule, t, shape=shape or "sqrt"), rel=1e-5, abs=1e-7)


def test_inverse_sqrt_without_warmup_and_decay_steps_set_the_horizon():
  fn = train.make_schedule(optim(lr=1.0, warmup_steps=0, schedule="inverse_sqrt"), 100)
  assert [float(fn(t)) for t in (0, 3, 99)] == pytest.approx([1.0, 0.5, 0.1])
  fn = train.make_schedule(optim(lr=1.0, min_lr=0.0, warmup_steps=0, decay_steps=50, schedule="wsd"), 100)
  assert [float(fn(t)) for t in (39, 40, 50, 80)] == pytest.approx([1.0, 1.0, 0.0, 0.0])


TINY = model.ModelConfig(
  vocab_size=40,
  max_len=16,
  d_model=16,
  n_layers=2,
  n_heads=4,
  n_kv_heads=2,
  d_ff=32,
  mlp="swiglu",
  pos_encoding="learned",
  tie_embeddings=False,
  attn_bias=True,
  mlp_bias=True,
)
DECAYED = {"wq", "wk", "wv", "wo", "w1", "w2", "w3", "embedding", "lm_head", "pos_embedding"}


def leaves_by_name(tree):
  """{parameter name (the last key): [leaves]} of a parameter-shaped tree."""
  named = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    named.setdefault(path[-1].key, []).append(leaf)
  return named


@pytest.mark.parametrize("scan", [True, False])
def test_weight_decay_applies_by_rule_to_matrices(scan):
  """Matrices (projections, embeddings, the head) decay; norm scales and biases, per-head q/k/v
  biases included, do not: the rule reads axis names, so a scanned [layers, embed] norm scale is
  no matrix. With zero gradients Adam's direction is 0, so a step is the decay alone: -lr * wd * p."""
  cfg = dataclasses.replace(TINY, scan_layers=scan)
  mask = optimizer_lib.decay_mask(train.param_roles(cfg), decay_adapters=False)
  named = leaves_by_name(mask)
  assert {name for name, flags in named.items() if all(flags)} == DECAYED
  assert {name for name, flags in named.items() if not any(flags)} == set(named) - DECAYED
  params = init_params(cfg, jax.random.key(0))
  tx, _ = train.make_optimizer(optim(lr=0.1, warmup_steps=0, weight_decay=0.5), 10, train.param_roles(cfg))
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  expected = jax.tree.map(lambda p, m: -0.1 * 0.5 * p * m, params, mask)
  jax.tree.map(lambda u, e: np.testing.assert_allclose(u, e, rtol=1e-6, atol=1e-9), updates, expected)


def test_lora_adapters_decay_only_when_asked():
  adapters = {"blocks": {"attn": {"wq": {"a": jnp.ones((2, 16, 4)), "b": jnp.ones((2, 4, 8))}}}}
  roles = train.param_roles(TINY, adapters=adapters)
  assert not any(jax.tree.leaves(optimizer_lib.decay_mask(roles, decay_adapters=False)))
  assert all(jax.tree.leaves(optimizer_lib.decay_mask(roles, decay_adapters=True)))


def first_update(name, params, grads, **values):
  cfg = optim(name=name, lr=0.01, warmup_steps=0, grad_clip=1e9, **values)
  tx, _ = train.make_optimizer(cfg, 10, train.param_roles(TINY))
  return jax.jit(tx.update)(grads, tx.init(params), params)[0]


@pytest.fixture(scope="module")
def params_and_grads():
  params = init_params(TINY, jax.random.key(0))
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
  grads = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), params)
  mask = optimizer_lib.decay_mask(train.param_roles(TINY), decay_adapters=False)
  return params, grads, mask


def test_adamw_lion_and_sgd_first_updates_match_their_definitions(params_and_grads):
  """First steps written out: Adam's bias-corrected m / sqrt(v) is g / |g| (plus eps); Lion's is
  sign(g); SGD's momentum buffer starts at g (Nesterov: g + momentum * g); decoupled decay -lr*wd*p
  on the matrices (SGD's is L2: wd * p added to the gradient)."""
  params, grads, mask = params_and_grads
  lr, wd = 0.01, 0.1
  cases = {
    "adamw": (dict(), lambda g, p, m: -lr * (g / (jnp.abs(g) + 1e-8) + wd * p * m)),
    "lion": (dict(), lambda g, p, m: -lr * (jnp.sign(g) + wd * p * m)),
    "sgd": (dict(momentum=0.9), lambda g, p, m: -lr * (g + wd * p * m)),
    "sgd-nesterov": (dict(momentum=0.9, nesterov=True), lambda g, p, m: -lr * 1.9 * (g + wd * p * m)),
  }
  for case, (values, rule) in cases.items():
    got = first_update(case.split("-")[0], params, grads, weight_decay=wd, **values)
    want = jax.tree.map(rule, grads, params, mask)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-8), got, want)


def test_adafactor_direction_is_optax_adafactors(params_and_grads):
  params, grads, _ = params_and_grads
  got = first_update("adafactor", params, grads, weight_decay=0.0)
  direct = optax.adafactor(0.01)
  want = direct.update(grads, direct.init(params), params)[0]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), got, want)


@pytest.mark.parametrize("name", config_lib.OPTIMIZERS)
def test_every_optimizer_decays_by_lr_times_wd_on_matrices_only(name, params_and_grads):
  """With zero gradients each optimizer's direction is 0, so a step is the decay alone: -lr * wd * p
  on the matrices (SGD's L2 term gives the same first step), nothing on norms and biases."""
  params, grads, mask = params_and_grads
  got = first_update(name, params, jax.tree.map(jnp.zeros_like, grads), weight_decay=0.5)
  want = jax.tree.map(lambda p, m: -0.01 * 0.5 * p * m, params, mask)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), got, want)


def test_muon_orthogonalises_each_layers_projection_as_a_matrix(params_and_grads):
  """Muon's update of a scanned projection, per layer and flattened to (inputs, outputs) — wq as
  [d_model, heads * head_dim], wo as [heads * head_dim, d_model] — equals optax's Muon on that 2D
  matrix; embeddings take its AdamW branch (optax's Nesterov AdamW)."""
  params, grads, mask = params_and_grads
  got = first_update("muon", params, grads, weight_decay=0.0)
  plain = contrib.muon(0.01, beta=0.95, eps=1e-8, adam_b1=0.9, adam_b2=0.99)
  for name, to_2d in (("wq", lambda x: x.reshape(16, -1)), ("wo", lambda x: x.reshape(-1, 16))):
    for layer in range(TINY.n_layers):
      g = {"w": to_2d(grads["blocks"]["attn"][name][layer])}
      p = {"w": to_2d(params["blocks"]["attn"][name][layer])}
      want = plain.update(g, plain.init(p), p)[0]["w"]
      np.testing.assert_allclose(to_2d(got["blocks"]["attn"][name][layer]), want, rtol=1e-4, atol=1e-7)
  adamw = optax.adamw(0.01, 0.9, 0.99, 1e-8, weight_decay=0.0, nesterov=True)
  e = {"e": params["embedding"]}
  want = adamw.update({"e": grads["embedding"]}, adamw.init(e), e)[0]["e"]
  np.testing.assert_allclose(got["embedding"], want, rtol=2e-5)
  # muon_adam_lr: the AdamW branch (and its decay) at its own rate, the matrices unchanged.
  own = first_update("muon", params, grads, weight_decay=0.5, muon_adam_lr=0.003)
  e_decay = -0.003 * 0.5 * params["embedding"]
  np.testing.assert_allclose(own["embedding"], 0.3 * want + e_decay, rtol=2e-5, atol=1e-9)
  wq = got["blocks"]["attn"]["wq"] - 0.01 * 0.5 * params["blocks"]["attn"]["wq"]
  np.testing.assert_allclose(own["blocks"]["attn"]["wq"], wq, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("name", config_lib.OPTIMIZERS)
def test_every_optimizer_trains_the_model(name):
  """Twenty steps on one repeated batch lower the loss by a fifth or more with each optimizer, at a
  rate that works for it (Lion's and Adafactor's scales differ from AdamW's)."""
  lr = {"adamw": 1e-2, "lion": 1e-2, "adafactor": 3e-1, "sgd": 3e-1, "muon": 2e-2}[name]
  values = dict(momentum=0.9) if name in ("sgd", "muon") else {}
  tx, schedule = train.make_optimizer(
    optim(name=name, lr=lr, schedule="constant", min_lr=0.0, warmup_steps=0, **values),
    20,
    train.param_roles(TINY),
  )
  params = init_params(TINY, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, 40, (4, 17)).astype(np.int32)

  def loss(p):
    logits = model.Transformer(TINY).apply({"params": p}, tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

  @jax.jit
  def step(p, state):
    value, grads = jax.value_and_grad(loss)(p)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state, value

  state, losses = tx.init(params), []
  for _ in range(20):
    params, state, value = step(params, state)
    losses.append(float(value))
  assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
def test_muon_with_wsd_resumes_bitwise(tmp_path, corpus_file):
  """A Muon state (optax's partitioned state, with masked-out nodes) checkpoints and restores: 3 steps,
  then a resume to 6, equals 6 steps straight; the WSD schedule runs through the loop."""
  from lmjax.run import checkpoint

  def run(name, steps):
    cfg = tiny_config(corpus_file, str(tmp_path / "tfds"), steps=steps, ckpt_every=3, num_samples=0)
    cfg.optim.update(name="muon", lr=0.02, schedule="wsd", decay_steps=6)
    train.train(cfg, str(tmp_path / name))

  run("straight", 6)
  run("resumed", 3)
  run("resumed", 6)
  straight, resumed = (
    checkpoint.load_params(str(tmp_path / n / "checkpoints" / "6")) for n in ("straight", "resumed")
  )
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)


def test_every_optimizer_declares_the_fields_it_reads():
  assert set(optimizer_lib.READS) == set(config_lib.OPTIMIZERS)
  base = config_lib.base_config().optim
  assert all(k in base for k in optimizer_lib.HYPERPARAMETERS)
