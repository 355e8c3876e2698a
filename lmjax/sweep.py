"""`python -m lmjax.sweep`: the command's name before the cli layer, kept so existing scripts run; the
same as `lmjax-sweep` (lmjax/cli/sweep.py)."""

from lmjax.cli import sweep

if __name__ == "__main__":
  sweep.run()
