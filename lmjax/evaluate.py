"""`python -m lmjax.evaluate`: the command's name before the cli layer, kept so existing scripts run; the
same as `lmjax-evaluate` (lmjax/cli/evaluate.py)."""

from lmjax.cli import evaluate

if __name__ == "__main__":
  evaluate.run()
