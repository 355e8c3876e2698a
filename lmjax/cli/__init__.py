"""Layer `cli`: the command-line entry points, one module each, all in one absl pattern: flags defined
at module level, `main(argv)` reading them, `run(argv=None)` as the console script (setup.py:
lmjax-train, lmjax-sample, lmjax-evaluate, lmjax-sweep, lmjax-scaling, lmjax-export, lmjax-serve) and
for `python -m lmjax.cli.NAME`. Calling `run([...])` from Python parses that argv and runs the command.

May import: every other layer. Nothing imports `cli`.

Every entry point starts with a quiet console: libraries log at INFO through absl/Python logging
(Orbax prints ~170 lines per `make run`, JAX reports the backends it probes); a run prints its own
progress lines and the libraries' INFO lines appear only with `--verbosity=1` (or higher), their
warnings always. Bad input (errors.UserError) prints `error: ...` and exits with status 2.
"""

import contextlib
import difflib
import glob
import os
import sys

from lmjax.core import hugepages

# The commands' modules before the cli layer (lmjax/main.py, ...): aliases of lmjax.cli.*.
_ALIASES = (
  "lmjax.main",
  "lmjax.sample",
  "lmjax.evaluate",
  "lmjax.sweep",
  "lmjax.scaling",
  "lmjax.export",
  "lmjax.serve",
)


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
from ml_collections.config_flags import config_flags as config_flags_lib  # noqa: E402

from lmjax.core import errors  # noqa: E402
from lmjax.run import config as config_lib, field_docs, rundir  # noqa: E402


def quiet_library_logging() -> None:
  """Sets absl/Python logging to WARNING unless the user passed --verbosity."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def parse_config_flags(argv):
  """absl flag parsing for commands with a `--config` experiment flag: any failure to parse the flags
  or to load the experiment prints one `error: ...` (`config_error`) and exits 2."""
  try:
    remaining = flags.FLAGS(argv)
    if flags.FLAGS["config"].value is not None:
      flags.FLAGS.config.keys()  # config_flags keeps a failed load until the config is first used
    return remaining
  except Exception as err:  # noqa: BLE001 (flags and the experiment's own code are the user's input)
    print(f"error: {config_error(argv, err)}", file=sys.stderr)
    sys.exit(2)


def config_error(argv, err) -> str:
  """The message for a failed parse: a missing experiment file names the files beside it; an
  override of a field neither the base config nor the experiment has names the closest fields; any
  other error (a bad value, the experiment's get_config raising) is its own message in one line."""
  spec = config_spec(argv) or ""
  path = spec.partition(":")[0]
  if isinstance(err, OSError) and path and not os.path.exists(path):
    found = sorted(glob.glob(os.path.join(os.path.dirname(path) or ".", "*.py")))
    return f"--config={spec}: no experiment file {path!r}" + (
      f"; that directory has: {', '.join(found)}" if found else ""
    )
  message = str(err).replace("\\n", "\n").replace("\\'", "'")
  if len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":  # a KeyError's repr
    message = message[1:-1]
  if "Traceback (most recent call last)" in message:  # the experiment's get_config raised
    lines = [line for line in message.splitlines() if line.strip()]
    message = f"{lines[0]} {lines[-1]}"
  fields = set(config_lib.flat_keys(config_lib.base_config()))
  with contextlib.suppress(Exception):  # fields the experiment adds (evals.*), when it loads
    fields |= set(config_lib.flat_keys(config_lib.load_experiment(spec)))
  unknown = []
  for arg in argv[1:]:
    field = arg.split("=")[0][len("--config.") :] if arg.startswith("--config.") else None
    if field is None or field in fields or field.rsplit(".", 1)[-1] not in message:
      continue  # a real field, or not what this error is about
    near = difflib.get_close_matches(field, sorted(fields), n=6, cutoff=0.6) or sorted(
      f for f in fields if f.startswith(field.rsplit(".", 1)[0] + ".")
    )
    sections = ", ".join(sorted({f.split(".")[0] + "." for f in fields if "." in f}))
    hint = f"did you mean: {', '.join(near)}" if near else f"fields are in {sections} (and seed)"
    unknown.append(f"--config.{field}: no such config field; {hint}")
  return "\n".join(unknown) or message


def config_spec(argv) -> str | None:
  """The `--config` value of `argv` (`--config=FILE[:variant]` or `--config FILE`), if any."""
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


_HELP_FLAGS = ("-h", "--help", "-?", "--helpshort")
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def print_help(main, argv) -> None:
  """`--help`: the command's docstring, its flags, and for commands with `--config` every config
  field with its value (the experiment's, when `--config` names one that loads) and its doc."""
  module = sys.modules[main.__module__]
  print((module.__doc__ or "").strip() + "\n\nflags:")
  for name, defined in flags.FLAGS.flags_by_module_dict().items():
    # Flags are filed under their module's name, or under the file path with `python -m`.
    if name.startswith("lmjax") or os.path.abspath(name).startswith(_PACKAGE + os.sep):
      for flag in defined:
        default = "" if flag.default is None else f" (default: {flag.default!r})"
        print(f"  --{flag.name}: {flag.help}{default}")
  if "config" in flags.FLAGS and config_flags_lib.is_config_flag(flags.FLAGS["config"]):
    spec, cfg = config_spec(argv), config_lib.base_config()
    if spec:
      try:
        cfg = config_lib.load_experiment(spec)
      except Exception as err:  # noqa: BLE001 (shown, and the defaults listed instead)
        print(f"\n--config={spec} does not load ({config_error(argv, err)}); the defaults follow.")
        spec = None
    print(f"\nconfig fields ({'of ' + spec if spec else 'defaults'}; override with --config.FIELD=VALUE):")
    print(field_docs.help_text(cfg))


def model_source(spec: str) -> str:
  """What `--model=RUN|pretrained:NAME` names, for pretrained.load: an lmjax run directory, or after
  `pretrained:` a registered name, a .gguf file or a Hugging Face directory. Raises errors.UserError for
  a bare value that is not a run."""
  name = spec.removeprefix("pretrained:")
  if name == spec and not rundir.is_run(spec):
    raise errors.UserError(
      f"--model={spec}: not an lmjax run directory; for other models write pretrained:NAME"
    )
  return name


def run(main, argv=None, flags_parser=app.parse_flags_with_usage) -> None:
  """absl's app.run(main) for `argv` (default sys.argv), with errors.UserError printed as one
  `error: ...` block and exit status 2 (no traceback), and `--help` printing `print_help` with exit
  status 0 (absl's exits 1 and lists no config fields)."""
  args = sys.argv if argv is None else argv
  if any(a in _HELP_FLAGS for a in args[1:]):
    print_help(main, args)
    sys.exit(0)

  def guarded(args):
    try:
      return main(args)
    except errors.UserError as err:
      print(f"error: {err}", file=sys.stderr, flush=True)
      sys.exit(2)

  app.run(guarded, argv=argv, flags_parser=flags_parser)
