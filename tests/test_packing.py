"""Packed documents: the segment mask in every attention implementation (numpy reference), and a
packed row trains each document exactly as a padded row of its own would (losses and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import model as M
from lmjax.ops import attention as attention_lib
from lmjax.tasks import losses

SEGMENTS = np.array([[1] * 5 + [2] * 7 + [3] * 4, [1] * 16])  # two rows of 16: three documents, one


def numpy_attention(q, k, v, segment_ids):
  """softmax(q k^T / sqrt(H) + mask) v in float64, mask = causal in row order and same segment."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  B, T, N, H = q.shape
  k, v = (np.repeat(a, N // a.shape[2], axis=2) for a in (k, v))
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
  visible = np.tril(np.ones((T, T), bool))[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
  logits = np.where(visible[:, None], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", probs, v)


@pytest.mark.parametrize("impl,blocks", [("reference", None), ("xla_cpu", 1), ("xla_cpu", 4)])
def test_segment_mask_matches_numpy_in_every_implementation(impl, blocks):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 16, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 16, 2, 8)), jnp.float32) for _ in range(2))
  pos = jnp.asarray(np.concatenate([np.arange(5), np.arange(7), np.arange(4)])[None].repeat(2, 0))
  seg = jnp.asarray(SEGMENTS, jnp.int32)
  common = dict(causal=True, window=None, dropout=None, operand_dtype=jnp.float32, segment_ids_BT=seg)
  if blocks is None:
    out = attention_lib.attention(q, k, v, pos, pos, impl=impl, **common)
  else:
    out = attention_lib._blocked(q, k, v, pos, pos, blocks=blocks, **common)
  np.testing.assert_allclose(out, numpy_attention(q, k, v, SEGMENTS), atol=1e-5)
  # Gradients agree between the implementations (xla_cpu has its own VJP).
  grads = [
    jax.grad(lambda q, impl=impl: attention_lib.attention(q, k, v, pos, pos, impl=impl, **common).sum())(q)
    for impl in ("reference", "xla_cpu")
  ]
  np.testing.assert_allclose(grads[0], grads[1], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("pos_encoding", ["rope", "learned"])
def test_packed_row_trains_each_document_as_its_own_padded_row(pos_encoding):
  """Per-document loss sums and the gradient of the batch loss are equal for the packed row and for
  one right-padded row per document (positions -1 and mask 0 on padding)."""
  cfg = M.ModelConfig(
    vocab_size=11, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, max_len=16, pos_encoding=pos_encoding
  )
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  docs = [rng.integers(0, 11, n) for n in (6, 8, 3)]  # 17 tokens: a row of 16 inputs + 1 target
  stream = np.concatenate(docs)
  seg_full = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])
  pos_full = np.concatenate([np.arange(len(d)) for d in docs])
  packed = {
    "inputs": stream[None, :16],
    "targets": stream[None, 1:],
    "segment_ids": seg_full[None, :16],
    "positions": pos_full[None, :16],
    "mask": (seg_full[:16] == seg_full[1:]).astype(np.float32)[None],
  }
  padded = {k: np.zeros((3, 16), np.int32) for k in ("inputs", "targets")}
  padded["mask"] = np.zeros((3, 16), np.float32)
  positions = np.full((3, 16), -1, np.int32)
  for r, doc in enumerate(docs):
    doc = doc[: 17 - sum(len(d) for d in docs[:r])]  # the last document is cut at the row's end
    n = len(doc) - 1
    padded["inputs"][r, :n], padded["targets"][r, :n], positions[r, :n] = doc[:-1], doc[1:], np.arange(n)
    padded["mask"][r, :n] = 1

  def run(p, batch, positions_BT=None):
    run_model = lambda tokens, **kw: M.Transformer(cfg).apply({"params": p}, tokens, **kw)
    if positions_BT is None:
      return losses.lm_loss(run_model, batch)
    logits = run_model(batch["inputs"], positions_BT=positions_BT)
    return losses.token_loss_sum(logits, batch["targets"], batch["mask"])

  def per_document_losses(logits, batch, rows_segments):
    ce = np.asarray(
      jax.vmap(lambda lg, t: -jax.nn.log_softmax(lg)[jnp.arange(16), t])(logits, batch["targets"])
    )
    return [float((ce * batch["mask"])[rows_segments == s].sum()) for s in (1, 2, 3)]

  packed_logits = M.Transformer(cfg).apply(
    {"params": params},
    packed["inputs"],
    positions_BT=packed["positions"],
    segment_ids_BT=packed["segment_ids"],
  )
  padded_logits = M.Transformer(cfg).apply({"params": params}, padded["inputs"], positions_BT=positions)
  got = per_document_losses(packed_logits, packed, packed["segment_ids"])
  expected = per_document_losses(padded_logits, padded, np.array([[1] * 16, [2] * 16, [3] * 16]))
  np.testing.assert_allclose(got, expected, rtol=1e-5)

  grad_packed = jax.jit(jax.grad(lambda p: run(p, packed)[0]))(params)
  grad_padded = jax.jit(jax.grad(lambda p: run(p, padded, positions)[0]))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grad_packed, grad_padded)
  assert run(params, packed)[1] == padded["mask"].sum()  # the same tokens count


def test_segment_ids_with_a_kv_cache_of_other_columns_are_refused():
  """A packed prefill writes its T tokens into a cache of exactly T columns; any other is refused."""
  cfg = M.ModelConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, max_len=8)
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="exactly the 2 packed tokens' columns.*has 8"):
    M.Transformer(cfg).apply(
      {"params": params},
      jnp.zeros((1, 2), jnp.int32),
      cache=M.init_cache(cfg, 1, 8),
      segment_ids_BT=jnp.ones((1, 2), jnp.int32),
    )


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("columns", [8, 24])
def test_a_packed_prompts_columns_move_to_the_start_of_its_own_row(scan_layers, columns):
  """engine_steps.unpacked_row: the second of two packed prompts (5 and 3 tokens in a pack of 16
  columns) comes out as a one-row cache of `columns` columns holding its keys and values at columns
  0-2 (keys [..., H, S], values [..., S, H]; stacked or per-layer caches), positions 0-2 then -1."""
  from lmjax.inference import engine_steps

  cfg = M.ModelConfig(vocab_size=11, d_model=16, n_layers=2, n_heads=2, max_len=32, scan_layers=scan_layers)
  packed = M.init_cache(cfg, 1, 16)
  numbered = lambda c: jnp.arange(c.size, dtype=c.dtype).reshape(c.shape)
  packed = {
    **M.map_kv(lambda axis, c: numbered(c), packed),
    "pos": jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 2] + [-1] * 8], jnp.int32),
  }
  row = engine_steps.unpacked_row(packed, jnp.int32(5), jnp.int32(3), columns)
  for got, want in zip(list(row["k"]), list(packed["k"])):  # layer by layer, stacked or not
    assert got.shape[-1] == columns
    np.testing.assert_array_equal(np.asarray(got)[..., :3], np.asarray(want)[..., 5:8])
  for got, want in zip(list(row["v"]), list(packed["v"])):
    assert got.shape[-2] == columns
    np.testing.assert_array_equal(np.asarray(got)[..., :3, :], np.asarray(want)[..., 5:8, :])
  assert np.asarray(row["pos"]).tolist() == [[0, 1, 2] + [-1] * (columns - 3)]
  assert np.asarray(row["end"]).tolist() == [3]
