"""Errors in what the user asked for, as opposed to bugs.

Entry points print a `UserError` as one `error: ...` line block and exit with status 2 (absl's
usage-error status), without a traceback: the message names the field or path and the fix.
"""


class UserError(Exception):
  """Bad input (config value, path, workdir state) that the user can fix; the message says how."""


class ConfigError(UserError, ValueError):
  """A config value out of range, inconsistent with another, or with the data, mesh or saved run."""
