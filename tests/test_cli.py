"""What a user meets at the command line: `--help`, and the docs every config field carries."""

import pytest

from lmjax.run import config as config_lib, field_docs

from conftest import run_lmjax


def test_every_config_field_has_a_doc():
  """The comment beside each default is its doc (field_docs reads them back for --help)."""
  docs = field_docs.field_docs()
  assert sorted(docs) == sorted(config_lib.flat_keys(config_lib.base_config()))
  assert [k for k, v in docs.items() if not v] == []
  assert docs["optim.lr"].startswith("peak learning rate")
  assert docs["model.n_kv_heads"] == "None = n_heads (MHA); 1 = MQA; else GQA"  # base_config's own comment


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "prepare", "sweep", "sample", "evaluate"])
def test_help_exits_0_and_lists_the_flags(command):
  result = run_lmjax(command, "--help", timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"lmjax-{command}" in result.stdout and "flags:" in result.stdout
  if command in ("train", "prepare", "sweep"):  # the commands that take an experiment
    assert "--config.optim.lr=0.001\n      peak learning rate" in result.stdout


@pytest.mark.slow
def test_help_shows_the_experiments_values():
  result = run_lmjax("train", "--config=experiments/shakespeare_char.py:gpu", "--help", timeout=120)
  assert result.returncode == 0 and "--config.train.seq_len=256" in result.stdout
