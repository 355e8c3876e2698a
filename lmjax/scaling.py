"""`python -m lmjax.scaling`: the command's name before the cli layer, kept so existing scripts run; the
same as `lmjax-scaling` (lmjax/cli/scaling.py)."""

from lmjax.cli import scaling

if __name__ == "__main__":
  scaling.run()
