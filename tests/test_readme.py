"""README.md runs as written: every python block, and every command of its bash blocks with tiny
settings appended (steps, samples, lengths), from a scratch directory that links the checkout's
`experiments/` and `.venv/`, so the docs cannot rot unnoticed.

Not run, by necessity: `make` (what runs this test), installs (`pip`, `python3 -m venv`), cluster
launches (`srun`, `--coordinator_address`: other machines), and lines with `...` placeholders.
Sweeps print their point commands (`--print_commands`; tests/test_sweep.py runs sweeps)."""

import json
import os
import re
import shlex
import subprocess

import pytest

from lmjax.data import shakespeare

from conftest import REPO

README = os.path.join(REPO, "README.md")
SKIP = ("make ", "pip ", "python3 -m venv", "srun ", "--coordinator_address", "...")
TINY = {  # appended to each command (absl takes a flag's last value)
  "lmjax-train": [
    "--config.train.steps=2",
    "--config.train.log_every=1",
    "--config.train.eval_every=2",
    "--config.train.eval_steps=1",
    "--config.train.ckpt_every=2",
    "--config.train.batch_size=2",
    "--config.train.num_samples=0",
  ],
  "lmjax-sample": ["--max_new_tokens=8"],
  "lmjax-sweep": ["--print_commands"],
  "lmjax-evaluate": ["--limit=2"],  # only lm-eval's mode reads it; the others ignore its value
  "lmjax-prepare": [],
  "lmjax-coordcheck": ["--widths=16,32", "--steps=1", "--head_dim=8", "--seq_len=16", "--batch_size=2"],
}


def blocks(language: str) -> list:
  with open(README, encoding="utf-8") as f:
    return re.findall(rf"```{language}\n(.*?)```", f.read(), re.S)


def commands(block: str) -> list:
  """The block's commands: continuation lines joined, comments and skipped lines dropped."""
  joined = block.replace("\\\n", " ")
  lines = [shlex.split(line, comments=True) for line in joined.splitlines()]
  return [" ".join(map(shlex.quote, words)) for words in lines if words and not _skipped(" ".join(words))]


def _skipped(command: str) -> bool:
  return any(marker in command for marker in SKIP) or not command.startswith(".venv/bin/")


def tiny(command: str) -> str:
  program = os.path.basename(shlex.split(command)[0])
  if "--dry_run" in command:
    return command
  return " ".join([command, *TINY.get(program, [])])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
  """A directory like the checkout after `make run`: experiments/ and .venv/ linked, a (tiny) trained
  runs/shakespeare_char, and the inputs the README's examples name (my_data.jsonl, web/, books/,
  corpus/). HOME points inside it, so token stores land there."""
  root = tmp_path_factory.mktemp("readme")
  for name in ("experiments", ".venv"):
    os.symlink(os.path.join(REPO, name), root / name)
  text = shakespeare.shakespeare_text()
  (root / "my_data.jsonl").write_text(
    "".join(f'{{"prompt": "Say {n} in digits:", "response": " {n}"}}\n' for n in range(40))
  )
  for directory, name, body in (
    (
      "web",
      "a.jsonl",
      "".join(json.dumps({"text": text[i : i + 4000]}) + "\n" for i in range(0, 200_000, 4000)),
    ),
    ("books", "a.txt", text[:200_000]),
    ("corpus", "plays.txt", text),
  ):
    (root / directory).mkdir()
    (root / directory / name).write_text(body)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HOME": str(root)}
  first = tiny(
    ".venv/bin/lmjax-train --config=experiments/shakespeare_char.py --workdir=runs/shakespeare_char"
  )
  subprocess.run(first, shell=True, cwd=root, env=env, check=True, capture_output=True, timeout=600)
  return root, env


def run(command: str, scratch):
  root, env = scratch
  return subprocess.run(command, shell=True, cwd=root, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_every_readme_command_runs(scratch):
  ran = []
  for block in blocks("bash"):
    for command in commands(block):
      result = run(tiny(command), scratch)
      assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
      ran.append(command)
  assert len(ran) >= 12  # the examples exist (a broken extraction would pass vacuously)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_every_readme_python_block_runs(scratch, index):
  code = blocks("python")[index]
  result = run(f".venv/bin/python -c {shlex.quote(code)}", scratch)
  assert result.returncode == 0, f"{code}\n{result.stderr[-3000:]}"
