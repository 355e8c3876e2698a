"""`python -m lmjax.export`: the same as `lmjax-export` (lmjax/cli/export.py)."""

from lmjax.cli import export

if __name__ == "__main__":
  export.run()
