"""`lmjax-sweep` (python -m lmjax.cli.sweep): run every point of an experiment's `get_sweep()`.

  lmjax-sweep --config=experiments/shakespeare_char.py --workdir=runs/lr_sweep [--parallel=2]
  lmjax-sweep ... --parallel=4 --devices_per_point=2    # an 8-GPU node: 4 points, 2 GPUs each
  lmjax-sweep ... --config.train.steps=100              # an override for every point
  lmjax-sweep ... --print_commands        # one shell command per point, for any scheduler
  lmjax-sweep ... --emit=slurm --slurm_gpus=1 --slurm_time=01:00:00   # sbatch job array
  lmjax-sweep ... --search=halving --eta=3 --rungs=3    # successive halving of get_sweep()'s points
  lmjax-sweep ... --search=optuna --trials=20           # TPE over get_search_space(), resumable

See research/sweep.py for what a point, its status and the results are; research/halving.py and
research/optuna_search.py for the two searches that choose which points train how long.
"""

import os
import shlex
import sys

from absl import app, flags
from ml_collections import config_flags

from lmjax import cli
from lmjax.core import errors, files
from lmjax.research import halving, optuna_search, slurm, sweep

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
flags.DEFINE_enum(
  "search",
  "grid",
  ["grid", "halving", "optuna"],
  "grid: every point of get_sweep() at full length; halving: successive halving of those points "
  "(--eta, --rungs); optuna: TPE over get_search_space() (--trials), the study kept in the workdir.",
)
flags.DEFINE_integer("eta", 3, "halving: keep the best 1/eta of a rung's points for the next rung.")
flags.DEFINE_integer("rungs", 3, "halving: rungs, ending at train.steps / eta^(rungs-1), ..., train.steps.")
flags.DEFINE_integer("trials", 20, "optuna: trials the study holds when done (earlier runs' count).")
flags.DEFINE_integer("startup_trials", 10, "optuna: random trials before TPE models the results.")
flags.DEFINE_integer("seed", 0, "optuna: the TPE sampler's seed.")
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
  if f.search != "grid" and (f.print_commands or f.emit):
    raise app.UsageError(f"--search={f.search} decides which points go on as it runs; it cannot be printed")
  if f.search == "optuna":
    return _optuna(config, base)
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
      path, slurm.slurm_script(config, f.workdir, points, f.slurm_gpus, f.slurm_time, f.slurm_partition, base)
    )
    print(f"wrote {path}: sbatch {path}")
    return
  if f.emit:
    raise app.UsageError(f"--emit={f.emit!r}: only 'slurm' is supported")
  try:
    if f.search == "halving":
      status = halving.run_halving(
        config, f.workdir, points, f.eta, f.rungs, f.parallel, f.devices_per_point, base
      )
    else:
      status = sweep.run_sweep(config, f.workdir, points, f.parallel, f.devices_per_point, base)
  except ValueError as err:  # the node lacks the devices asked for; the directory holds another sweep
    raise errors.UserError(str(err)) from None
  if status:
    sys.exit(status)


def _optuna(config: str, base: dict) -> None:
  """--search=optuna: the study over the experiment's get_search_space()."""
  f = flags.FLAGS
  module = sweep.experiment_module(config)
  if not hasattr(module, "get_search_space"):
    raise errors.UserError(
      f"{config} defines no get_search_space(); add one returning {{field: [choices] or (low, high)}}"
    )
  space = module.get_search_space()
  swept = sorted(set(space) & set(base)) if isinstance(space, dict) else []
  if swept:
    raise errors.UserError(
      f"--config.{swept[0]} is set on the command line but {config}'s get_search_space() varies it; drop one"
    )
  os.makedirs(f.workdir, exist_ok=True)
  try:
    status = optuna_search.run_optuna(
      config, f.workdir, space, f.trials, f.seed, f.startup_trials, f.parallel, f.devices_per_point, base
    )
  except ValueError as err:
    raise errors.UserError(str(err)) from None
  if status:
    sys.exit(status)


def run(argv=None):
  """The console script: parses `argv` (default sys.argv) and runs `main`."""
  cli.run(main, argv, flags_parser=cli.parse_config_flags)


if __name__ == "__main__":
  run()
