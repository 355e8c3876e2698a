"""`python -m lmjax.sample`: the command's name before the cli layer, kept so existing scripts run; the
same as `lmjax-sample` (lmjax/cli/sample.py)."""

from lmjax.cli import sample

if __name__ == "__main__":
  sample.run()
