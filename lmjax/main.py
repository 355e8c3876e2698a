"""Entry point: `python -m lmjax.main --config=experiments/NAME.py[:variant] --workdir=DIR`.

Any config field can be overridden from the command line, e.g.
`--config.optim.lr=3e-4 --config.train.steps=500`.
"""
from absl import app, flags
from ml_collections import config_flags

from lmjax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file (python), optionally `file.py:variant`.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for everything this run writes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  train.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
