"""The compiled train and eval steps: loss, gradients (accumulated over micro-batches), NaN guard,
optimizer update. A step is a pure function of (state, batch, frozen weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lmjax import model
from lmjax.core import sharding
from lmjax.tasks import losses
from lmjax.train.state import TrainState


def make_train_step(
  model_cfg,
  optimizer,
  schedule,
  seed: int,
  grad_accum: int,
  shardings,
  batch_sharding,
  frozen_shardings=None,
  model_params=None,
  loss=losses.lm_loss,
  rules=sharding.DEFAULT_RULES,
):
  """The jitted step `(state, batch, frozen) -> (state, metrics)`.

  `model_params(trainable, frozen)` builds the weights the model runs with (LoRA: the merged
  base); by default the trainable params are the model params and `frozen` is None. `loss(run_model,
  batch)` is the objective as (loss sum, weight) (losses.py; next-token prediction by default). With
  `grad_accum` micro-batches the sums and weights are added before dividing, so the step equals one
  full-batch step.
  """
  transformer = model.Transformer(model_cfg)
  model_params = model_params or (lambda trainable, frozen: trainable)

  def loss_fn(params, frozen, batch, rng):
    weights = {"params": model_params(params, frozen)}
    run_model = lambda tokens, **kw: transformer.apply(
      weights, tokens, deterministic=False, rngs={"dropout": rng}, **kw
    )
    with sharding.activation_sharding(batch_sharding.mesh, rules):
      return loss(run_model, batch)

  sum_and_grads = jax.value_and_grad(loss_fn, has_aux=True)  # ((loss sum, weight), grads of the sum)

  def loss_and_grads(params, frozen, batch, rng):
    if grad_accum == 1:
      (total, weight), grads = sum_and_grads(params, frozen, batch, rng)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

      def accumulate(carry, i_and_batch):
        i, micro_batch = i_and_batch
        (total, weight), grads = sum_and_grads(params, frozen, micro_batch, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (total, weight, grads)), None

      zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      (total, weight, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro))
    weight = jnp.maximum(weight, 1.0)
    return total / weight, jax.tree.map(lambda g: g / weight, grads)

  def train_step(state: TrainState, batch: dict, frozen):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)  # dropout depends on (seed, step) only
    loss, grads = loss_and_grads(state.params, frozen, batch, rng)
    grad_norm = optax.tree.norm(grads)
    healthy = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state.first_bad_step < 0)

    def update():
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      return optax.apply_updates(state.params, updates), opt_state

    # A NaN/Inf step leaves params and optimizer state as they were and is recorded; the host
    # stops the run at its next check, so a poisoned state is never saved.
    params, opt_state = jax.lax.cond(healthy, update, lambda: (state.params, state.opt_state))
    first_bad = jnp.where((state.first_bad_step < 0) & ~healthy, state.step, state.first_bad_step)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step)}
    return TrainState(state.step + 1, params, opt_state, first_bad), metrics

  return jax.jit(
    train_step,
    in_shardings=(shardings, batch_sharding, frozen_shardings),
    out_shardings=(shardings, None),
    donate_argnums=0,
  )


def make_eval_step(
  model_cfg,
  param_shardings,
  batch_sharding,
  frozen_shardings=None,
  model_params=None,
  loss=losses.lm_loss,
  rules=sharding.DEFAULT_RULES,
):
  """The jitted `(params, batch, frozen) -> (loss sum, weight)` on one validation batch."""
  transformer = model.Transformer(model_cfg)
  model_params = model_params or (lambda trainable, frozen: trainable)

  def eval_step(params, batch, frozen):
    weights = {"params": model_params(params, frozen)}
    with sharding.activation_sharding(batch_sharding.mesh, rules):
      return loss(lambda tokens, **kw: transformer.apply(weights, tokens, **kw), batch)

  return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding, frozen_shardings))
