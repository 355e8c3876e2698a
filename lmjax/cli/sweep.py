"""`lmjax-sweep` (python -m lmjax.cli.sweep): run every point of an experiment's `get_sweep()`.

  lmjax-sweep --config=experiments/shakespeare_char.py --workdir=runs/lr_sweep [--parallel=2]
  lmjax-sweep ... --parallel=4 --devices_per_point=2    # an 8-GPU node: 4 points, 2 GPUs each
  lmjax-sweep ... --config.train.steps=100              # an override for every point
  lmjax-sweep ... --print_commands        # one shell command per point, for any scheduler
  lmjax-sweep ... --emit=slurm --slurm_gpus=1 --slurm_time=01:00:00   # sbatch job array

See research/sweep.py for what a point, its status and the results are.
"""

import os
import shlex
import sys

from absl import app, flags
from ml_collections import config_flags

from lmjax import cli
from lmjax.core import errors, files
from lmjax.research import sweep

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Experiment file with get_sweep(), optionally file.py:variant; --config.FIELD=VALUE for every point.",
)
flags.DEFINE_string("workdir", None, "Sweep directory: one subdirectory per point, results beside them.")
flags.DEFINE_integer("parallel", 1, "Points to run at the same time (local processes).")
flags.DEFINE_integer(
  "devices_per_point",
  0,
  "GPUs or TPU chips each running point gets to itself (disjoint; 0: the points share the node's).",
)
flags.DEFINE_bool("print_commands", False, "Print one command per point instead of running.")
flags.DEFINE_string("emit", None, "'slurm': write a job-array sbatch script instead of running.")
flags.DEFINE_integer("slurm_gpus", 1, "GPUs per array task.")
flags.DEFINE_string("slurm_time", "04:00:00", "Time limit per array task.")
flags.DEFINE_string("slurm_partition", "", "SLURM partition.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  """Runs, prints or emits the sweep as the flags say; exits with the sweep's status."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logging()
  f = flags.FLAGS
  config = config_flags.get_config_filename(flags.FLAGS["config"])
  base = dict(config_flags.get_override_values(flags.FLAGS["config"]))
  try:
    drawn = sweep.sweep_points(config)
    swept = sorted({k for p in drawn for k in p} & set(base))
    if swept:
      raise errors.UserError(
        f"--config.{swept[0]} is set on the command line but {config}'s get_sweep() varies it; drop one"
      )
  except ValueError as err:
    raise errors.UserError(str(err)) from None
  points = sweep.distinct_points(drawn)
  if len(points) < len(drawn):
    print(
      f"{len(drawn) - len(points)} of {len(drawn)} sweep points repeat an earlier one; running the "
      f"{len(points)} distinct points once each",
      flush=True,
    )
  os.makedirs(f.workdir, exist_ok=True)
  if f.print_commands or f.emit:  # their points run later, in this directory: record what they share
    try:
      sweep.record_base(f.workdir, base)
    except ValueError as err:
      raise errors.UserError(str(err)) from None
  if f.print_commands:
    for p in points:
      print(shlex.join(sweep.point_command(config, os.path.join(f.workdir, sweep.point_name(p)), p, base)))
    return
  if f.emit == "slurm":
    path = os.path.join(f.workdir, "sweep.sbatch")
    files.write_atomic(
      path, sweep.slurm_script(config, f.workdir, points, f.slurm_gpus, f.slurm_time, f.slurm_partition, base)
    )
    print(f"wrote {path}: sbatch {path}")
    return
  if f.emit:
    raise app.UsageError(f"--emit={f.emit!r}: only 'slurm' is supported")
  try:
    status = sweep.run_sweep(config, f.workdir, points, f.parallel, f.devices_per_point, base)
  except ValueError as err:  # the node lacks the devices asked for; the directory holds another sweep
    raise errors.UserError(str(err)) from None
  if status:
    sys.exit(status)


def run(argv=None):
  """The console script: parses `argv` (default sys.argv) and runs `main`."""
  cli.run(main, argv, flags_parser=cli.parse_config_flags)


if __name__ == "__main__":
  run()
