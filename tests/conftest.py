"""Shared fixtures: a small corpus and the tiny experiment config."""

import gc
import os
import subprocess
import sys

import jax
import pytest

from lmjax.run import config

# Implicit rank promotion (adding a [T] array to a [B, T] one) hides shape bugs: an error in tests,
# and (through the environment) in every command a test starts.
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's compiled programs after each test module. Each one keeps ~3 memory mappings of JIT
  code, and the whole suite in one process compiled enough to pass Linux's vm.max_map_count (65530):
  XLA then segfaulted inside a compile near the end of `make test` (session 20)."""
  yield
  jax.clear_caches()
  gc.collect()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_EXPERIMENT = os.path.join(REPO, "tests", "tiny_experiment.py")

_VERSE = """ROMEO:
But, soft! what light through yonder window breaks?
It is the east, and Juliet is the sun.
Arise, fair sun, and kill the envious moon,
Who is already sick and pale with grief,
That thou her maid art far more fair than she.

JULIET:
O Romeo, Romeo! wherefore art thou Romeo?
Deny thy father and refuse thy name;
Or, if thou wilt not, be but sworn my love,
And I'll no longer be a Capulet.

"""


@pytest.fixture
def corpus_file(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text(_VERSE * 30, encoding="utf-8")
  return str(path)


def tiny_config(corpus_file: str, data_dir: str, **train_overrides):
  cfg = config.load_experiment(TINY_EXPERIMENT)
  cfg.data.text_files = corpus_file
  cfg.data.data_dir = data_dir
  cfg.train.update(**train_overrides)
  return cfg


def tiny_flags(corpus_file: str, data_dir: str, workdir: str, *extra):
  return [
    "--config=" + TINY_EXPERIMENT,
    "--workdir=" + workdir,
    "--config.data.text_files=" + corpus_file,
    "--config.data.data_dir=" + data_dir,
    *extra,
  ]


def run_lmjax(name: str, *args, env=None, timeout: int = 300) -> subprocess.CompletedProcess:
  """Runs `python -m lmjax.cli.NAME ARGS` from the repository root (CPU only), capturing its text."""
  env = env or {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  command = [sys.executable, "-m", f"lmjax.cli.{name}", *args]
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def is_utf8(raw: bytes) -> bool:
  """Whether `raw` decodes as UTF-8 alone (a token's bytes can be part of a character)."""
  try:
    raw.decode("utf-8")
    return True
  except UnicodeDecodeError:
    return False
