"""`lmjax-scaling` (python -m lmjax.cli.scaling): fit L(N) = a * N^(-alpha) + c to a finished sweep.

lmjax-scaling --sweep_dir=runs/scaling
"""

import os

from absl import app, flags

from lmjax import cli
from lmjax.research import scaling

flags.DEFINE_string("sweep_dir", None, "A finished model-size sweep (lmjax-sweep ...).")
flags.mark_flags_as_required(["sweep_dir"])


def main(argv):
  """Fits the law and prints scaling.md (research/scaling.py writes the files)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logging()
  sweep_dir = flags.FLAGS.sweep_dir
  fit = scaling.report(sweep_dir)
  with open(os.path.join(sweep_dir, "scaling.md")) as f:
    print(f.read())
  print(f"alpha = {fit['alpha']:.3f}; wrote scaling.md, scaling.json, scaling.png in {sweep_dir}")


def run(argv=None):
  """The console script: parses `argv` (default sys.argv) and runs `main`."""
  cli.run(main, argv)


if __name__ == "__main__":
  run()
