"""Generation past the context: nanoGPT's crop vs a rolling KV cache, quality and speed.

For a trained RoPE run: the mean next-token loss on Shakespeare's validation tail at positions past
the context, each token predicted from its last max_len tokens, (a) cropped (the window re-placed at
positions 0..max_len-1, a full forward pass per token) and (b) as a rolling cache computes it
(positions keep counting, attention to the last max_len positions; a sliding-window forward over the
whole sequence is the same computation, tests/test_sample.py). Then greedy decode tokens/s of each
past the context, batch 1.

  lmjax-train --config=experiments/shakespeare_char.py --workdir=/tmp/rope_run \\
    --config.model.pos_encoding=rope
  python benchmarks/past_context.py --workdir=/tmp/rope_run
"""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lmjax import cli, model
from lmjax.data import shakespeare
from lmjax.inference import LanguageModel, sampler

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run with RoPE positions.", required=True)
_LENGTH = flags.DEFINE_integer("length", 1024, "Tokens per scored sequence.")
_SEQUENCES = flags.DEFINE_integer("sequences", 8, "Sequences scored (from the last 10% of the plays).")
_NEW = flags.DEFINE_integer("new_tokens", 512, "Tokens generated per timing (from a 16-token prompt).")


@jax.jit
def _losses(logits_TV, targets_T):
  return -jnp.take_along_axis(jax.nn.log_softmax(logits_TV, -1), targets_T[:, None], -1)[:, 0]


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg, params, tokens_BT):
  return model.Transformer(cfg).apply({"params": params}, tokens_BT)


def crop_losses(cfg, params, ids):
  """Per-token loss for positions max_len..len-1, each from its own window at positions 0..W-1."""
  W = cfg.max_len
  windows = np.stack([ids[t - W + 1 : t + 1] for t in range(W - 1, len(ids) - 1)])
  chunks = [np.asarray(_logits(cfg, params, windows[i : i + 64])[:, -1]) for i in range(0, len(windows), 64)]
  return np.asarray(_losses(np.concatenate(chunks), jnp.asarray(ids[W:])))


def rolling_losses(cfg, params, ids):
  """The same tokens' losses as a rolling cache computes them: one sliding-window forward."""
  long_cfg = dataclasses.replace(cfg, max_len=len(ids), sliding_window=cfg.max_len)
  logits = _logits(long_cfg, params, jnp.asarray(ids[None, :-1]))[0]
  return np.asarray(_losses(logits[cfg.max_len - 1 :], jnp.asarray(ids[cfg.max_len :])))


def main(_):
  cli.quiet_library_logging()
  lm = LanguageModel.from_workdir(_WORKDIR.value)
  cfg, params = lm.cfg, lm.params
  if cfg.pos_encoding != "rope":
    raise app.UsageError(f"{_WORKDIR.value}: pos_encoding={cfg.pos_encoding!r}; a rolling cache needs rope")
  text = shakespeare.shakespeare_text()
  ids = np.asarray(lm.tokenizer.encode(text[int(len(text) * 0.9) :]), np.int32)
  starts = np.linspace(0, len(ids) - _LENGTH.value - 1, _SEQUENCES.value).astype(int)
  crop, rolling = [], []
  for s in starts:
    crop.append(crop_losses(cfg, params, ids[s : s + _LENGTH.value]))
    rolling.append(rolling_losses(cfg, params, ids[s : s + _LENGTH.value]))
  crop, rolling = np.concatenate(crop), np.concatenate(rolling)
  scored = f"{_SEQUENCES.value} x {_LENGTH.value}"
  print(f"{_WORKDIR.value}: context {cfg.max_len}, {len(crop)} tokens past it ({scored})")
  print(f"  mean loss, crop:    {crop.mean():.4f}")
  print(f"  mean loss, rolling: {rolling.mean():.4f}  (difference {rolling.mean() - crop.mean():+.4f})")
  greedy = sampler.SamplingConfig(temperature=0.0)
  prompt = [ids[:16].tolist()]
  for way in ("crop", "rolling") * 4:  # interleaved; the first of each compiles
    start = time.perf_counter()
    out = sampler.generate_tokens(cfg, params, prompt, _NEW.value, greedy, past_context=way)
    seconds = time.perf_counter() - start
    made = len(out.tokens[0])
    print(f"  {way:8s} greedy, batch 1, {made} tokens: {made / seconds:7.1f} tok/s")


if __name__ == "__main__":
  app.run(main)
