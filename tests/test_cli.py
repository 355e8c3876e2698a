"""What a user meets at the command line: `--help`, and the docs every config field carries."""

import types

import pytest

from lmjax.run import config as config_lib, field_docs
from lmjax.train import preflight

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
  assert "\n  --" in result.stdout.split("flags:")[1]  # the command's flags, also under `python -m`
  if command in ("train", "prepare", "sweep"):  # the commands that take an experiment
    assert "--config.optim.lr=0.001\n      peak learning rate" in result.stdout


@pytest.mark.slow
def test_help_shows_the_experiments_values():
  result = run_lmjax("train", "--config=experiments/shakespeare_char.py:gpu", "--help", timeout=120)
  assert result.returncode == 0 and "--config.train.seq_len=256" in result.stdout


def test_a_corpus_too_small_for_its_tokenizer_or_model_is_warned_with_numbers():
  cfg = config_lib.base_config()
  cfg.data.tokenizer = "bpe"
  small = types.SimpleNamespace(train_tokens=100_000, tokenizer=types.SimpleNamespace(vocab_size=4096))
  vocab, model = preflight.size_warnings(cfg, small, params=800_000)
  assert "4096 ids for 100,000 train tokens (24.4 per id; want >= 50)" in vocab and "(e.g. 1024)" in vocab
  assert "800,000 parameters for 100,000 train tokens (0.12 per parameter" in model
  cfg.data.tokenizer = "char"  # the default run: 4.3M characters for a 0.8M-parameter model
  plays = types.SimpleNamespace(train_tokens=4_300_000, tokenizer=types.SimpleNamespace(vocab_size=78))
  assert preflight.size_warnings(cfg, plays, params=800_000) == []
  tiny_corpus = types.SimpleNamespace(train_tokens=10_000, tokenizer=types.SimpleNamespace(vocab_size=512))
  cfg.data.tokenizer = "bytelevel"  # too small for any BPE: no vocabulary below 256 byte ids helps
  assert (
    "Use more text, or data.tokenizer='char' or 'byte'" in preflight.size_warnings(cfg, tiny_corpus, 100)[0]
  )
  cfg.finetune.task = "qa"  # fine-tuning: the base model's choices, not the corpus's
  assert preflight.size_warnings(cfg, small, params=800_000) == []


@pytest.mark.slow
@pytest.mark.parametrize(
  "args,message",
  [
    (
      ["--config=experiments/nope.py"],
      "error: --config=experiments/nope.py: no experiment file 'experiments/nope.py'",
    ),
    (
      ["--config=experiments/shakespeare_char.py:tpu"],
      "ValueError: unknown variant 'tpu' of shakespeare_char",
    ),
    (["--config=experiments/shakespeare_char.py", "--config.train.steps=abc"], "invalid literal for int()"),
  ],
)
def test_user_errors_are_one_message_and_exit_2(tmp_path, args, message):
  """No traceback: the message (and what to do) in a few lines, exit status 2."""
  result = run_lmjax("train", *args, f"--workdir={tmp_path / 'run'}", timeout=120)
  assert result.returncode == 2 and message in result.stderr
  assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 3


@pytest.mark.slow
def test_an_experiment_that_raises_or_reads_a_missing_file_is_one_message(tmp_path):
  raises = tmp_path / "raises.py"
  raises.write_text("def get_config():\n  raise RuntimeError('no such corpus yet')\n")
  reads = tmp_path / "reads.py"
  reads.write_text("def get_config():\n  return open('/nonexistent/settings.txt')\n")
  for path, message in ((raises, "no such corpus yet"), (reads, "/nonexistent/settings.txt")):
    result = run_lmjax("train", f"--config={path}", f"--workdir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert "no experiment file" not in result.stderr  # the file is there; what it does failed


def test_old_runs_attention_name_still_loads():
  """Runs saved before attention_impl 'xla' was renamed 'reference' load as 'reference'."""
  from lmjax import model

  assert model.ModelConfig(attention_impl="xla").attention_impl == "reference"
