"""Layer `cli`: the command-line entry points, one module each, all in one absl pattern: flags defined
at module level, `main(argv)` reading them, `run(argv=None)` as the console script
(setup.py: lmjax-train, lmjax-sample, lmjax-evaluate, lmjax-sweep, lmjax-scaling) and for
`python -m lmjax.cli.NAME`. Calling `run([...])` from Python parses that argv and runs the command.

May import: every other layer. Nothing imports `cli`.

Every entry point starts with a quiet console: libraries log at INFO through absl/Python logging
(Orbax prints ~170 lines per `make run`, JAX reports the backends it probes); a run prints its own
progress lines and the libraries' INFO lines appear only with `--verbosity=1` (or higher), their
warnings always. Bad input (errors.UserError) prints `error: ...` and exits with status 2.
"""

import os
import sys

from lmjax.core import hugepages

# The commands' modules before the cli layer (lmjax/main.py, ...): aliases of lmjax.cli.*.
_ALIASES = ("lmjax.main", "lmjax.sample", "lmjax.evaluate", "lmjax.sweep", "lmjax.scaling")


def _is_command_module(name: str) -> bool:
  return name.startswith("lmjax.cli.") or name in _ALIASES


def _started_as_command(orig_argv) -> bool:
  """Whether the interpreter's command line (`sys.orig_argv`) runs an lmjax command (`lmjax-*`, or
  `python [options] -m lmjax.cli.*`), not a Python program (or test) that imports the package."""
  args = list(orig_argv[1:])
  while args:
    arg = args.pop(0)
    if arg == "-m":
      return bool(args) and _is_command_module(args[0])
    if arg.startswith("-m"):
      return _is_command_module(arg[2:])
    if arg == "-c":
      return False
    if arg in ("-X", "-W"):  # options that take a value
      args = args[1:]
    elif not arg.startswith("-"):
      return os.path.basename(arg).startswith("lmjax-")
  return False


if _started_as_command(sys.orig_argv):  # before any entry point imports JAX: this may re-execute the process
  hugepages.reexec_with_huge_pages()

from absl import app, flags, logging  # noqa: E402 (after the re-exec above)

from lmjax.core import errors  # noqa: E402


def quiet_library_logging() -> None:
  """Sets absl/Python logging to WARNING unless the user passed --verbosity."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def run(main, argv=None, flags_parser=app.parse_flags_with_usage) -> None:
  """absl's app.run(main) for `argv` (default sys.argv), with errors.UserError printed as one
  `error: ...` block and exit status 2 (no traceback)."""

  def guarded(args):
    try:
      return main(args)
    except errors.UserError as err:
      print(f"error: {err}", file=sys.stderr, flush=True)
      sys.exit(2)

  app.run(guarded, argv=argv, flags_parser=flags_parser)
