"""What every command-line entry point does before its work: a quiet console.

Libraries log at INFO through absl/Python logging (Orbax prints ~170 lines per `make run`, JAX
reports the backends it probes). A run prints its own progress lines; the libraries' INFO lines
appear only when asked for with `--verbosity=1` (or higher), their warnings always.
"""
from absl import flags, logging


def quiet_library_logging() -> None:
  """Sets absl/Python logging to WARNING unless the user passed --verbosity."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
