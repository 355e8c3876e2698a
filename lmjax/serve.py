"""`python -m lmjax.serve`: the same as `lmjax-serve` (lmjax/cli/serve.py)."""

from lmjax.cli import serve

if __name__ == "__main__":
  serve.run()
