"""μP: the multipliers against Tensor Programs V's table (Adam column), their effect on init, logits,
attention and updates, equality with sp at the base width, and the coordinate check."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import model, train
from lmjax.core import errors
from lmjax.model import mup
from lmjax.research import coord_check
from lmjax.run import config as config_lib

# Jitted: flax's init traced once instead of run op by op (seconds for these shapes).
init_params = jax.jit(model.init_params, static_argnums=0)

BASE = model.ModelConfig(
  vocab_size=64, max_len=16, d_model=64, n_layers=2, n_heads=4, d_ff=256, tie_embeddings=False
)


def wide(m: int, head_dim: int = 16, base_head_dim=None) -> model.ModelConfig:
  """BASE widened m times (heads x head_dim = d_model), under μP with BASE as its base."""
  return dataclasses.replace(
    BASE,
    d_model=64 * m,
    d_ff=256 * m,
    n_heads=64 * m // head_dim,
    head_dim=head_dim,
    parametrization="mup",
    mup_base_width=64,
    mup_base_head_dim=base_head_dim,
  )


def test_multipliers_follow_the_papers_table():
  """TP5 Table 3 (Adam): hidden init var 1/fan_in (std x 1/sqrt(m) from the base), hidden lr 1/m,
  output logits 1/m, embeddings unchanged; attention 1/d instead of 1/sqrt(d)."""
  cfg = wide(4, head_dim=64, base_head_dim=16)
  assert mup.width_mult(cfg) == 4
  assert mup.hidden_init_mult(cfg) == pytest.approx(1 / 2)
  assert mup.hidden_lr_mult(cfg) == pytest.approx(1 / 4)
  assert mup.logit_mult(cfg) == pytest.approx(1 / 4)
  # kernel's 1/sqrt(64) times the query multiplier = sqrt(16)/64 (1/sqrt(d) at the base's 16)
  assert mup.query_mult(cfg) / math.sqrt(64) == pytest.approx(math.sqrt(16) / 64)
  sp = dataclasses.replace(cfg, parametrization="sp", mup_base_width=None, mup_base_head_dim=None)
  assert [f(sp) for f in (mup.width_mult, mup.hidden_lr_mult, mup.logit_mult, mup.query_mult)] == [1, 1, 1, 1]


def test_initialisation_stds_follow_the_table():
  params = init_params(wide(8), jax.random.key(0))
  std = lambda x: float(np.std(np.asarray(x)))
  assert std(params["blocks"]["attn"]["wq"]) == pytest.approx(0.02 / math.sqrt(8), rel=0.03)
  assert std(params["blocks"]["mlp"]["w1"]) == pytest.approx(0.02 / math.sqrt(8), rel=0.03)
  out = 0.02 / math.sqrt(8) / math.sqrt(2 * BASE.n_layers)  # output projections' depth scaling kept
  assert std(params["blocks"]["mlp"]["w2"]) == pytest.approx(out, rel=0.03)
  assert std(params["embedding"]) == pytest.approx(0.02, rel=0.03)
  assert std(params["lm_head"]) == pytest.approx(0.02, rel=0.03)


def test_at_the_base_width_mup_is_sp_and_its_logits_and_queries_scale_as_the_table_says():
  tokens = np.random.default_rng(0).integers(0, 64, (2, 16)).astype(np.int32)
  sp = dataclasses.replace(BASE, head_dim=16)
  params = init_params(sp, jax.random.key(1))
  apply = lambda cfg, p: np.asarray(model.Transformer(cfg).apply({"params": p}, tokens))
  at_base = dataclasses.replace(sp, parametrization="mup", mup_base_width=64)
  np.testing.assert_array_equal(apply(at_base, params), apply(sp, params))
  # Wider than its base (m = 4), the same weights give logits / 4 when nothing else changes: here the
  # base width is declared 16 for the same 64-wide model.
  quarter = dataclasses.replace(sp, parametrization="mup", mup_base_width=16)
  np.testing.assert_allclose(apply(quarter, params), apply(sp, params) / 4, rtol=1e-5, atol=1e-6)
  # A base head dim of 4 for heads of 16: the queries are scaled by sqrt(4/16), which is what sp
  # computes with wq scaled by the same factor (q = x wq; RoPE is linear).
  heads = dataclasses.replace(sp, parametrization="mup", mup_base_width=64, mup_base_head_dim=4)
  scaled = jax.tree_util.tree_map_with_path(lambda path, x: x * 0.5 if path[-1].key == "wq" else x, params)
  np.testing.assert_allclose(apply(heads, params), apply(sp, scaled), rtol=1e-5, atol=1e-6)


def test_hidden_matrices_take_lr_over_m_and_embeddings_the_base_lr():
  """AdamW's first step is lr * g/|g| per coordinate: hidden matrices move lr/m, the rest lr."""
  cfg = wide(4)
  params = init_params(cfg, jax.random.key(0))
  grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
  optim = config_lib.base_config().optim
  optim.update(lr=0.01, warmup_steps=0, weight_decay=0.0, grad_clip=1e9)
  tx, _ = train.make_optimizer(optim, 10, train.param_roles(cfg))
  updates = jax.jit(tx.update)(grads, tx.init(params), params)[0]
  np.testing.assert_allclose(updates["blocks"]["attn"]["wo"], -0.01 / 4, rtol=1e-5)
  np.testing.assert_allclose(updates["blocks"]["mlp"]["w2"], -0.01 / 4, rtol=1e-5)
  np.testing.assert_allclose(updates["embedding"], -0.01, rtol=1e-5)
  np.testing.assert_allclose(updates["lm_head"], -0.01, rtol=1e-5)
  np.testing.assert_allclose(updates["blocks"]["attn_norm"]["scale"], -0.01, rtol=1e-5)


def test_mup_fields_are_checked():
  with pytest.raises(ValueError, match="read only with model.parametrization='mup'"):
    dataclasses.replace(BASE, mup_base_width=32)
  with pytest.raises(ValueError, match="needs model.mup_base_width"):
    dataclasses.replace(BASE, parametrization="mup")
  with pytest.raises(ValueError, match="breaks μP's width-independent input layer"):
    dataclasses.replace(BASE, parametrization="mup", mup_base_width=32, scale_embeddings=True)
  cfg = config_lib.base_config()
  cfg.model.update(parametrization="mup", mup_base_width=64)
  cfg.optim.name = "sgd"
  with pytest.raises(errors.ConfigError, match="use optim.name in \\['adamw', 'lion'\\]"):
    config_lib.validate(cfg)


@pytest.mark.slow
def test_coordinate_check_is_flat_in_width_under_mup_and_grows_under_sp():
  """The μP paper's coordinate check at widths 32 and 128, four AdamW steps at lr 1e-2: under μP every
  activation's RMS stays within 2.5x across the 4x width at every step; under sp the blocks'
  activations grow more than 4x by the last step."""
  base = model.ModelConfig(vocab_size=2, max_len=32, d_model=32, n_layers=2, n_heads=2, d_ff=128)
  mup_run = coord_check.coord_check(base, [32, 128], "mup", steps=4)
  sp_run = coord_check.coord_check(base, [32, 128], "sp", steps=4)
  for step in range(5):
    assert all(0.4 < r < 2.5 for r in coord_check.width_growth(mup_run, step).values()), step
  growth = coord_check.width_growth(sp_run, 4)
  assert min(v for k, v in growth.items() if k.startswith("block")) > 4, growth


def test_transfer_report_finds_each_widths_best_rate_and_its_shift(tmp_path):
  """mup_transfer on a hand-made results table: the best rate per width and the shift in grid steps."""
  from lmjax.research import mup_transfer

  losses = {  # (parametrization, width): final val loss at lr 1e-3, 2e-3, 4e-3
    ("sp", 32): (2.0, 1.9, 1.8),  # best 4e-3
    ("sp", 256): (1.7, 1.8, 2.5),  # best 1e-3: two grid steps away
    ("mup", 32): (2.0, 1.8, 1.9),
    ("mup", 256): (1.9, 1.6, 1.7),  # both best at 2e-3
  }
  rows = [
    {"model.parametrization": p, "model.d_model": str(w), "optim.lr": str(lr), "final_val_loss": str(v)}
    for (p, w), values in losses.items()
    for lr, v in zip((1e-3, 2e-3, 4e-3), values)
  ]
  rows.append(
    {"model.parametrization": "sp", "model.d_model": "256", "optim.lr": "0.004", "final_val_loss": ""}
  )
  columns = list(rows[0])
  (tmp_path / "results.csv").write_text(
    ",".join(columns) + "\n" + "".join(",".join(r[c] for c in columns) + "\n" for r in rows)
  )
  summary = mup_transfer.report(str(tmp_path))
  assert summary["best_lr"] == {"sp": {"32": 4e-3, "256": 1e-3}, "mup": {"32": 2e-3, "256": 2e-3}}
  assert summary["shift_in_grid_steps"] == {"sp": 2, "mup": 0}
  assert (tmp_path / "mup_transfer.png").exists() and "2 grid steps" in (
    tmp_path / "mup_transfer.md"
  ).read_text()
