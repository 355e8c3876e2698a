"""Model tests against independent references: formulas and numpy re-implementations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lmjax import model as M
from lmjax.ops import attention as attention_lib, matmul as matmul_lib

TINY = dict(vocab_size=37, max_len=16, d_model=32, n_layers=2, n_heads=4, d_ff=48)


def tiny(**overrides) -> M.ModelConfig:
  return M.ModelConfig(**{**TINY, **overrides})


def random_tokens(cfg, batch=2, length=10, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, cfg.vocab_size)


# ---------------------------------------------------------------- numpy references


def np_softmax(x, axis=-1):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def np_rope(x_TNH, pos_T, theta):
  """Rotate dimension pairs (j, j + H/2) by pos * theta^(-2j/H) (Llama convention)."""
  out = np.empty_like(x_TNH)
  half = x_TNH.shape[-1] // 2
  for t, p in enumerate(pos_T):
    for j in range(half):
      a = p * theta ** (-2 * j / x_TNH.shape[-1])
      x1, x2 = x_TNH[t, :, j], x_TNH[t, :, j + half]
      out[t, :, j] = x1 * math.cos(a) - x2 * math.sin(a)
      out[t, :, j + half] = x1 * math.sin(a) + x2 * math.cos(a)
  return out


def np_attention(x_TD, p, n_heads, n_kv_heads, rope_theta=None):
  """softmax(QK^T / sqrt(d_k)) V with a causal mask, KV heads repeated for GQA."""
  q = np.einsum("td,dnh->tnh", x_TD, p["wq"]) + p.get("wq_bias", 0)
  k = np.einsum("td,dnh->tnh", x_TD, p["wk"]) + p.get("wk_bias", 0)
  v = np.einsum("td,dnh->tnh", x_TD, p["wv"]) + p.get("wv_bias", 0)
  T, H = x_TD.shape[0], q.shape[-1]
  if rope_theta:
    q, k = np_rope(q, np.arange(T), rope_theta), np_rope(k, np.arange(T), rope_theta)
  group = n_heads // n_kv_heads
  k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
  heads = []
  for n in range(n_heads):
    scores = q[:, n] @ k[:, n].T / np.sqrt(H)
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    heads.append(np_softmax(scores) @ v[:, n])
  out = np.einsum("tnh,nhd->td", np.stack(heads, 1), p["wo"])
  return out + p.get("wo_bias", 0)


# ---------------------------------------------------------------- tests


@pytest.mark.slow
@pytest.mark.parametrize("pos", M.POS_ENCODINGS)
def test_causality(pos):
  cfg = tiny(pos_encoding=pos, n_kv_heads=2)
  params = M.init_params(cfg, jax.random.key(1))
  tokens = random_tokens(cfg)
  logits = Transformer_apply(cfg, params, tokens)
  for t in (0, 4, 9):
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size)
    new = Transformer_apply(cfg, params, changed)
    np.testing.assert_array_equal(new[:, :t], logits[:, :t])
    assert np.abs(new[:, t] - logits[:, t]).max() > 1e-6


def Transformer_apply(cfg, params, tokens):
  return np.asarray(M.Transformer(cfg).apply({"params": params}, tokens))


def test_sinusoidal_table_matches_formula():
  d, positions = 16, np.arange(12)
  expected = np.zeros((12, d))
  for i in positions:
    for j in range(d // 2):
      expected[i, 2 * j] = math.sin(i / 10000 ** (2 * j / d))
      expected[i, 2 * j + 1] = math.cos(i / 10000 ** (2 * j / d))
  got = M.sinusoidal_encoding(jnp.asarray(positions)[None], d)[0]
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_rope_matches_pair_rotation_and_is_relative():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 6, 2, 8)).astype(np.float32)
  pos = np.arange(3, 9)
  got = M.apply_rope(jnp.asarray(x), jnp.asarray(pos)[None], 100.0)[0]
  np.testing.assert_allclose(got, np_rope(x[0].astype(np.float64), pos, 100.0), atol=1e-5)
  # q.k after rotation depends only on the distance between the two positions.
  q, k = rng.normal(size=(1, 1, 1, 8)), rng.normal(size=(1, 1, 1, 8))

  def score(i, j):
    rq = M.apply_rope(jnp.asarray(q, jnp.float32), jnp.array([[i]]), 100.0)
    rk = M.apply_rope(jnp.asarray(k, jnp.float32), jnp.array([[j]]), 100.0)
    return float(jnp.sum(rq * rk))

  assert score(7, 3) == pytest.approx(score(24, 20), abs=1e-4)
  assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-3)


@pytest.mark.parametrize("impl", ["xla_cpu", "reference", "blockwise"])
@pytest.mark.parametrize(
  "n_kv_heads,bias,rope,causal",
  [
    (4, False, False, False),
    (2, True, False, False),
    (1, False, True, False),
    (4, True, False, True),
    (2, False, True, True),
  ],
)
@pytest.mark.slow
def test_attention_matches_numpy(n_kv_heads, bias, rope, causal, impl):
  """causal False: the mask from positions; True: the training path with a constant causal mask."""
  cfg = tiny(
    n_kv_heads=n_kv_heads, attn_bias=bias, pos_encoding="rope" if rope else "none", attention_impl=impl
  )
  x = jax.random.normal(jax.random.key(2), (1, 8, cfg.d_model))
  pos = jnp.arange(8)[None]
  attn = M.Attention(cfg, causal=causal)
  params = nn.unbox(attn.init(jax.random.key(3), x, pos, pos)["params"])
  if bias:  # non-zero biases, so the test sees them
    params = {k: v + 0.1 * (k.endswith("bias")) for k, v in params.items()}
  got, _ = attn.apply({"params": params}, x, pos, pos)
  np_params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  expected = np_attention(
    np.asarray(x[0], np.float64), np_params, cfg.n_heads, n_kv_heads, cfg.rope_theta if rope else None
  )
  np.testing.assert_allclose(got[0], expected, atol=1e-5)


@pytest.mark.slow
def test_scaled_embeddings_equal_a_table_times_sqrt_d():
  cfg = tiny(tie_embeddings=False, pos_encoding="sinusoidal")
  params = M.init_params(cfg, jax.random.key(4))
  tokens = random_tokens(cfg)
  scaled_table = {**params, "embedding": params["embedding"] * math.sqrt(cfg.d_model)}
  np.testing.assert_allclose(
    Transformer_apply(
      tiny(tie_embeddings=False, pos_encoding="sinusoidal", scale_embeddings=True), params, tokens
    ),
    Transformer_apply(cfg, scaled_table, tokens),
    rtol=1e-5,
    atol=1e-5,
  )


@pytest.mark.parametrize("kind", M.MLP_KINDS)
def test_mlp_matches_formula(kind):
  cfg = tiny(mlp=kind, mlp_bias=True)
  x = jax.random.normal(jax.random.key(4), (1, 5, cfg.d_model))
  mlp = M.MLP(cfg)
  params = nn.unbox(mlp.init(jax.random.key(5), x)["params"])
  params = {k: v + 0.05 if k.startswith("b") else v for k, v in params.items()}
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  xn = np.asarray(x[0], np.float64)
  h = xn @ p["w1"] + p["b1"]
  if kind == "relu":
    h = np.maximum(0, h)
  elif kind == "gelu":  # tanh approximation, as in GPT-2
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
  else:
    h = h / (1 + np.exp(-h)) * (xn @ p["w3"] + p["b3"])
  expected = h @ p["w2"] + p["b2"]
  np.testing.assert_allclose(mlp.apply({"params": params}, x)[0], expected, atol=1e-5)


def test_rmsnorm_and_layernorm_match_formula():
  x = np.random.default_rng(1).normal(size=(1, 3, 8)).astype(np.float32)
  rms = M.Norm(tiny(norm="rmsnorm", d_model=8, norm_eps=1e-6)).apply(
    {"params": {"scale": np.full(8, 2.0)}}, x
  )
  np.testing.assert_allclose(rms, 2 * x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6), atol=1e-5)
  ln = M.Norm(tiny(norm="layernorm", d_model=8, norm_eps=1e-6)).apply(
    {"params": {"scale": np.ones(8), "bias": np.full(8, 0.5)}}, x
  )
  np.testing.assert_allclose(
    ln, (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) + 0.5, atol=1e-5
  )
  ln_no_bias = M.Norm(tiny(norm="layernorm", norm_bias=False, d_model=8, norm_eps=1e-6)).apply(
    {"params": {"scale": np.full(8, 3.0)}}, x
  )  # nanoGPT's LayerNorm(bias=False): a "bias" param would fail here
  np.testing.assert_allclose(
    ln_no_bias, 3 * (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6), atol=1e-5
  )


@pytest.mark.slow
def test_scanned_and_unrolled_layers_agree():
  scanned_cfg = tiny(n_layers=3, n_kv_heads=2, scan_layers=True)
  unrolled_cfg = tiny(n_layers=3, n_kv_heads=2, scan_layers=False)
  params = M.init_params(scanned_cfg, jax.random.key(6))
  unrolled = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(3):
    unrolled[f"block_{i}"] = jax.tree.map(lambda w, i=i: w[i], params["blocks"])
  assert jax.tree.structure(unrolled) == jax.tree.structure(M.init_params(unrolled_cfg, jax.random.key(0)))
  tokens = random_tokens(scanned_cfg)
  np.testing.assert_allclose(
    Transformer_apply(scanned_cfg, params, tokens),
    Transformer_apply(unrolled_cfg, unrolled, tokens),
    atol=1e-5,
  )


def closed_form_params(c: M.ModelConfig) -> int:
  D, F, V, H = c.d_model, c.d_ff, c.vocab_size, c.head_dim or c.d_model // c.n_heads
  N, K = c.n_heads, c.n_kv_heads or c.n_heads
  norm = D * (2 if c.norm == "layernorm" and c.norm_bias else 1)
  attn = D * N * H * 2 + D * K * H * 2 + (N * H + 2 * K * H + D if c.attn_bias else 0)
  mlp = D * F * (3 if c.mlp == "swiglu" else 2)
  if c.mlp_bias:
    mlp += F * (2 if c.mlp == "swiglu" else 1) + D
  per_layer = 2 * norm + attn + mlp
  pos = c.max_len * D if c.pos_encoding == "learned" else 0
  return V * D + pos + c.n_layers * per_layer + norm + (0 if c.tie_embeddings else D * V)


@pytest.mark.parametrize(
  "overrides",
  [
    dict(),
    dict(
      norm="layernorm",
      mlp="relu",
      attn_bias=True,
      mlp_bias=True,
      pos_encoding="learned",
      tie_embeddings=False,
    ),
    dict(norm="layernorm", norm_bias=False, pos_encoding="learned"),  # nanoGPT's bias=False
    dict(mlp="swiglu", n_kv_heads=1, head_dim=16, mlp_bias=True),
    # SmolLM2-135M's shape: the well-known 134,515,008 parameters.
    dict(
      vocab_size=49152,
      max_len=2048,
      d_model=576,
      n_layers=30,
      n_heads=9,
      n_kv_heads=3,
      d_ff=1536,
      mlp="swiglu",
    ),
  ],
)
def test_param_count_closed_form(overrides):
  cfg = tiny(**overrides)
  assert M.param_count(cfg) == closed_form_params(cfg)
  if cfg.d_model == 576:
    assert M.param_count(cfg) == 134_515_008


def test_train_flops_per_token_formula():
  cfg = tiny(pos_encoding="learned", tie_embeddings=False)
  n_matmul = closed_form_params(cfg) - cfg.vocab_size * cfg.d_model - cfg.max_len * cfg.d_model
  assert M.train_flops_per_token(cfg, 16) == 6 * n_matmul + 12 * cfg.n_layers * 16 * cfg.d_model
  # LoRA: the frozen base costs forward + input gradient (2 + 2 FLOPs per parameter and token), the
  # 1000 adapter parameters all three (2 + 2 + 2); attention is unchanged.
  lora = M.train_flops_per_token(cfg, 16, lora_params=1000)
  assert lora == 4 * n_matmul + 6 * 1000 + 12 * cfg.n_layers * 16 * cfg.d_model


def test_mfu_peaks_come_from_the_datasheet_table():
  assert M.datasheet_peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert M.datasheet_peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12  # not the SXM number
  assert M.datasheet_peak_flops("NVIDIA H200", "float32") == 494.5e12  # TF32
  assert M.datasheet_peak_flops("TPU v5 lite", "bfloat16") == 197e12
  assert M.datasheet_peak_flops("cpu", "float32") is None  # no datasheet: MFU only when asked


@pytest.mark.slow
@pytest.mark.parametrize("pos,scan", [("rope", True), ("learned", False)])
def test_kv_cache_decode_matches_full_forward(pos, scan):
  cfg = tiny(pos_encoding=pos, n_kv_heads=2, scan_layers=scan)
  params = M.init_params(cfg, jax.random.key(7))
  tokens = random_tokens(cfg, length=9)
  full = Transformer_apply(cfg, params, tokens)
  cache = M.init_cache(cfg, 2, cfg.max_len)
  model = M.Transformer(cfg)
  prefill, cache = model.apply({"params": params}, tokens[:, :5], cache=cache)
  steps = [prefill]
  for t in range(5, 9):
    logits, cache = model.apply({"params": params}, tokens[:, t : t + 1], cache=cache)
    steps.append(logits)
  assert np.abs(np.concatenate(steps, 1) - full).max() < 1e-4


@pytest.mark.slow
def test_padding_positions_are_masked():
  cfg = tiny(n_kv_heads=2)
  params = M.init_params(cfg, jax.random.key(8))
  tokens = random_tokens(cfg, batch=1, length=6)
  plain = Transformer_apply(cfg, params, tokens)
  padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), tokens], 1)  # left-padded by 3
  positions = jnp.concatenate([jnp.full((1, 3), -1), jnp.arange(6)[None]], 1)
  got = M.Transformer(cfg).apply({"params": params}, padded, positions_BT=positions)
  np.testing.assert_allclose(got[:, 3:], plain, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_keeps_values_and_gradients(policy):
  base, remat = tiny(), tiny(remat=policy)
  params = M.init_params(base, jax.random.key(9))
  tokens = random_tokens(base)

  def loss(cfg, p):
    return M.Transformer(cfg).apply({"params": p}, tokens).mean()

  g_base, g_remat = jax.grad(lambda p: loss(base, p))(params), jax.grad(lambda p: loss(remat, p))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_base, g_remat)


@pytest.mark.slow
@pytest.mark.parametrize("low_precision", [dict(dtype="bfloat16"), dict(matmul_dtype="bfloat16")])
def test_bf16_compute_gives_fp32_logits_close_to_fp32(low_precision):
  f32, bf16 = tiny(), tiny(**low_precision)
  params = M.init_params(f32, jax.random.key(10))
  tokens = random_tokens(f32)
  low = M.Transformer(bf16).apply({"params": params}, tokens)
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, Transformer_apply(f32, params, tokens), atol=0.05)


@pytest.mark.parametrize("w_is_NK", [False, True])
def test_bf16_operand_matmul_gradients_match_numpy(w_is_NK):
  """The custom backward of the mixed-precision matmul, compiled: fp32 gradients within bf16 rounding.

  Compiled because XLA:CPU rewrites the backward dots (layouts, transposes) only
  inside one program; `w_is_NK` is the tied-embedding head, x @ w.T.
  """
  rng = np.random.default_rng(0)
  x, w_KN, g = rng.normal(size=(24, 16)), rng.normal(size=(16, 8)), rng.normal(size=(24, 8))
  w = w_KN.T if w_is_NK else w_KN
  loss = lambda x, w: jnp.sum(matmul_lib.matmul_fp32_accumulate(x, w, jnp.bfloat16, w_is_NK) * g)
  y = jax.jit(lambda x, w: matmul_lib.matmul_fp32_accumulate(x, w, jnp.bfloat16, w_is_NK))(
    x.astype(np.float32), w.astype(np.float32)
  )
  dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32
  np.testing.assert_allclose(y, x @ w_KN, rtol=0, atol=0.05 * np.abs(x @ w_KN).max())
  np.testing.assert_allclose(dx, g @ w_KN.T, rtol=0, atol=0.05 * np.abs(g @ w_KN.T).max())
  dw_KN = x.T @ g
  np.testing.assert_allclose(dw, dw_KN.T if w_is_NK else dw_KN, rtol=0, atol=0.05 * np.abs(dw_KN).max())


@pytest.mark.parametrize("operand_dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 0.03)])
@pytest.mark.parametrize("with_dropout", [False, True])
@pytest.mark.parametrize("rows", [16, attention_lib._MIN_ROWS_FOR_K_COPY])  # below / at the row-major K copy
def test_attention_core_matches_autodiff_of_plain_softmax_attention(operand_dtype, tol, with_dropout, rows):
  """The hand-written backward (and the bf16-operand path) against jax.grad of the textbook formula."""
  rng = np.random.default_rng(3)
  q, dout = (jnp.asarray(rng.normal(size=(2, 2, rows, 8)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.normal(size=(2, 2, 12, 8)), jnp.float32) for _ in range(2))
  bias = jnp.where(rng.random((2, 1, rows, 12)) < 0.3, attention_lib._MASK_VALUE, 0.0).at[..., 0].set(0.0)
  keep = jnp.asarray((rng.random((2, 2, rows, 12)) < 0.8) / 0.8, jnp.float32) if with_dropout else None

  def reference(q, k, v):
    probs = jax.nn.softmax(jnp.einsum("bkmh,bksh->bkms", q, k) + bias, axis=-1)
    return jnp.einsum("bkms,bksh->bkmh", probs if keep is None else probs * keep, v)

  def vjp(f):
    out, pullback = jax.vjp(f, q, k, v)
    return (out, *pullback(dout))

  expected = jax.jit(lambda: vjp(reference))()
  got = jax.jit(
    lambda: vjp(lambda q, k, v: attention_lib.attention_core(q, k, v, bias, keep, operand_dtype))
  )()
  for name, e, g in zip(("out", "dq", "dk", "dv"), expected, got):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, e, rtol=0, atol=tol * float(jnp.abs(e).max()), err_msg=name)


@pytest.mark.slow
def test_attention_dropout_is_active_in_training_only():
  """attn_dropout reaches attention_core: training outputs depend on the dropout key (and the
  gradient is finite), evaluation equals the same model without attention dropout."""
  cfg = tiny(attn_dropout=0.5)
  params = M.init_params(cfg, jax.random.key(12))
  tokens = random_tokens(cfg)
  train = lambda p, key: M.Transformer(cfg).apply(
    {"params": p}, tokens, deterministic=False, rngs={"dropout": key}
  )
  a, b = train(params, jax.random.key(1)), train(params, jax.random.key(2))
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
  np.testing.assert_allclose(
    M.Transformer(cfg).apply({"params": params}, tokens), Transformer_apply(tiny(), params, tokens), atol=1e-5
  )
  grads = jax.jit(jax.grad(lambda p: train(p, jax.random.key(1)).mean()))(params)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


@pytest.mark.slow
def test_bf16_matmul_model_gradients_close_to_fp32():
  """The whole compiled gradient with bf16 matmul operands (tied head included) tracks fp32."""
  f32, bf16 = tiny(), tiny(matmul_dtype="bfloat16")
  params = M.init_params(f32, jax.random.key(11))
  tokens = random_tokens(f32)
  grad = lambda cfg: jax.jit(jax.grad(lambda p: M.Transformer(cfg).apply({"params": p}, tokens).std()))(
    params
  )
  for a, b in zip(jax.tree.leaves(grad(f32)), jax.tree.leaves(grad(bf16))):
    np.testing.assert_allclose(b, a, rtol=0, atol=0.05 * float(np.abs(a).max()) + 1e-6)


@pytest.mark.slow
def test_params_carry_logical_axis_names():
  cfg = tiny(mlp="swiglu", tie_embeddings=False)
  boxed = M.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  names = nn.get_partition_spec(boxed)
  assert names["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
  assert names["lm_head"] == jax.sharding.PartitionSpec("embed", "vocab")
  assert names["blocks"]["attn"]["wq"] == jax.sharding.PartitionSpec("layers", "embed", "heads", "kv")
  assert names["blocks"]["mlp"]["w1"] == jax.sharding.PartitionSpec("layers", "embed", "mlp")
  for spec in jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
    assert all(axis is not None for axis in spec), f"unnamed dimension in {spec}"


@pytest.mark.parametrize(
  "overrides,field",
  [
    (dict(pos_encoding="alibi"), "pos_encoding"),
    (dict(d_model=30, n_heads=4), "n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(mlp="tanh"), "mlp"),
    (dict(norm="batchnorm"), "norm"),
    (dict(remat="some"), "remat"),
    (dict(dtype="float8"), "dtype"),
  ],
)
def test_bad_config_values_name_field_and_allowed_values(overrides, field):
  with pytest.raises(ValueError, match=f"model.{field}") as err:
    tiny(**overrides)
  assert "allowed" in str(err.value)


def test_unknown_config_key_lists_valid_keys():
  with pytest.raises(ValueError, match="unknown model config keys \\['n_layer'\\].*n_layers"):
    M.ModelConfig.from_dict({"n_layer": 2})


def test_mfu_peak_covers_every_device(monkeypatch):
  """Logged tokens/s are the global batch's, so MFU's peak is the per-device peak times the devices."""
  import types

  from lmjax.train import loop

  monkeypatch.setattr(loop.jax, "device_count", lambda: 8)
  tc = types.SimpleNamespace(peak_tflops=2.0, measure_peak=False)
  peak, text = loop._peak(tc, M.ModelConfig())
  assert peak == 16e12 and "per device x 8" in text
  tc.peak_tflops = 0.0  # on this CPU: no datasheet entry, nothing measured, no MFU
  assert loop._peak(tc, M.ModelConfig())[0] is None
