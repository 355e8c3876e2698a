"""`python -m lmjax.prepare`: the same as `lmjax-prepare` (lmjax/cli/prepare.py)."""

from lmjax.cli import prepare

if __name__ == "__main__":
  prepare.run()
