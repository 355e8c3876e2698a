"""Entry point: `python -m lmjax.main --config=experiments/NAME.py[:variant] --workdir=DIR`.

Any config field can be overridden on the command line, e.g.
`--config.optim.lr=3e-4 --config.train.steps=500`; an unknown field is an
error that lists the valid ones. Re-running the same command resumes from the
run's latest checkpoint.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from lmjax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file (python), optionally `file.py:variant`.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for everything this run writes.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  """absl flag parsing, with a readable error for overrides of fields that do not exist."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as err:
    message = str(err).replace("\\n", "\n").replace("\\'", "'").strip("'\"")
    overrides = [a.split("=")[0][len("--config."):] for a in argv[1:] if a.startswith("--config.")]
    if overrides:
      valid = "\n  ".join(config_lib.flat_keys(config_lib.base_config()))
      message += f"\n(overridden fields: {overrides}); valid config fields are:\n  {valid}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from lmjax import train  # after flag parsing: importing jax is slow
  train.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
