"""Every experiment file loads, validates, and builds its model."""

import glob
import os

import pytest

from lmjax.research import sweep
from lmjax.run import config
from lmjax.train import preflight

from conftest import REPO

EXPERIMENTS = sorted(glob.glob(os.path.join(REPO, "experiments", "*.py")))
VARIANTS = {
  "shakespeare_char.py": ["", "gpu"],
  "shakespeare_llama.py": ["", "bpe"],
  "finetune_smollm2.py": ["qa", "summarize", "translate", "search"],
}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_experiment_loads_and_validates(path):
  for variant in VARIANTS.get(os.path.basename(path), [""]):
    cfg = config.load_experiment(path + (f":{variant}" if variant else ""))
    config.validate(cfg)
    assert config.model_config(cfg, vocab_size=100).max_len == cfg.train.seq_len


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_every_sweep_point_is_a_valid_run(path):
  """Each point of get_sweep() (or a draw of get_search_space()) passes the checks lmjax-train makes
  before reading data: a sweep never spends its time on points that fail at their first line."""
  module = sweep.experiment_module(path)
  points = sweep.sweep_points(path) if hasattr(module, "get_sweep") else []
  if hasattr(module, "get_search_space"):
    points += sweep.random_search(module.get_search_space(), count=4, seed=0)
  for point in points:
    cfg = sweep.point_config(path, point)
    assert cfg is not None, point
    config.validate(cfg)
    preflight.check_fields_used(cfg)


def test_unknown_variant_is_an_error():
  with pytest.raises(ValueError, match="unknown variant 'tpu'.*known"):
    config.load_experiment(os.path.join(REPO, "experiments", "shakespeare_char.py:tpu"))


def test_default_experiment_matches_nanogpt_cpu_config():
  cfg = config.load_experiment(os.path.join(REPO, "experiments", "shakespeare_char.py"))
  m, t, o = cfg.model, cfg.train, cfg.optim
  assert (m.n_layers, m.n_heads, m.d_model, t.seq_len, t.batch_size, t.steps) == (4, 4, 128, 64, 12, 2000)
  assert (o.lr, o.min_lr, o.warmup_steps, o.b1, o.b2, o.weight_decay, o.grad_clip) == (
    1e-3,
    1e-4,
    100,
    0.9,
    0.99,
    0.1,
    1.0,
  )
  assert (m.dropout, m.pos_encoding, m.mlp, m.norm, t.eval_every, t.eval_steps) == (
    0.0,
    "learned",
    "gelu",
    "layernorm",
    250,
    20,
  )
  gpu = config.load_experiment(os.path.join(REPO, "experiments", "shakespeare_char.py:gpu"))
  assert (
    gpu.model.n_layers,
    gpu.model.d_model,
    gpu.train.seq_len,
    gpu.train.batch_size,
    gpu.train.steps,
    gpu.model.dropout,
    gpu.model.attn_dropout,
  ) == (6, 384, 256, 64, 5000, 0.2, 0.2)
  # nanoGPT's train.py: bias=False (no biases in Linear layers or LayerNorms)
  assert (gpu.model.attn_bias, gpu.model.mlp_bias, gpu.model.norm_bias) == (False, False, False)


def test_the_reference_applies_only_on_its_data():
  """A run is compared with the experiment's published reference only on the corpus and tokenizer it
  was measured for; a reference without them is refused."""
  cfg = config.load_experiment(os.path.join(REPO, "experiments", "shakespeare_char.py"))
  assert config.reference_applies(cfg)
  for field, value in (("sources", "text:/data/mine.txt"), ("dataset", "text_files"), ("tokenizer", "bpe")):
    changed = config.load_experiment(os.path.join(REPO, "experiments", "shakespeare_char.py"))
    changed.data[field] = value
    assert not config.reference_applies(changed), field
  cfg.reference.dataset = ""
  with pytest.raises(config.errors.ConfigError, match="set reference.dataset and reference.tokenizer"):
    config.validate(cfg)
