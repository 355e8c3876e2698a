"""`python -m lmjax.main`: the command's name before the cli layer, kept so existing scripts run; the
same as `lmjax-train` (lmjax/cli/train.py)."""

from lmjax.cli import train

if __name__ == "__main__":
  train.run()
