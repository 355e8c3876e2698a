"""`lmjax-coordcheck` (python -m lmjax.cli.coordcheck): μP's coordinate check (research/coord_check.py).

Trains one small model shape at several widths for a few AdamW steps under each parametrization and
plots each layer's activation RMS against width, step by step: flat under μP, growing under sp.

  lmjax-coordcheck --widths=32,64,128,256 --steps=10 --out=runs/coord_check
"""

from absl import app, flags

from lmjax import cli, model
from lmjax.research import coord_check

flags.DEFINE_list("widths", ["32", "64", "128", "256"], "d_model values (d_ff and heads scale with it).")
flags.DEFINE_list("parametrizations", ["sp", "mup"], "sp and/or mup.")
flags.DEFINE_integer("steps", 10, "AdamW steps per width (activations recorded after each).")
flags.DEFINE_float("lr", 1e-2, "Constant learning rate (μP: the base width's).")
flags.DEFINE_integer("n_layers", 2, "Transformer blocks.")
flags.DEFINE_integer("head_dim", 16, "Head dim, fixed across widths (heads = width / head_dim).")
flags.DEFINE_integer("seq_len", 64, "Characters per sequence.")
flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
flags.DEFINE_string("out", "runs/coord_check", "Where coord_check.json and coord_check.png go.")


def main(argv):
  """Runs the check for each parametrization, prints the width growth of each activation at the last
  step, and writes the report."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logging()
  f = flags.FLAGS
  widths = sorted(int(w) for w in f.widths)
  if len(widths) < 2 or any(w % f.head_dim for w in widths):
    raise app.UsageError(f"give two or more --widths, multiples of --head_dim={f.head_dim}")
  base = model.ModelConfig(
    vocab_size=2,
    max_len=f.seq_len,
    d_model=widths[0],
    n_layers=f.n_layers,
    n_heads=widths[0] // f.head_dim,
    d_ff=4 * widths[0],
    pos_encoding="learned",
  )
  results = {}
  for param in f.parametrizations:
    results[param] = coord_check.coord_check(base, widths, param, f.steps, f.lr, f.batch_size)
    growth = coord_check.width_growth(results[param], f.steps)
    print(f"{param}: RMS at width {widths[-1]} / width {widths[0]} after {f.steps} steps:")
    for name, ratio in growth.items():
      print(f"  {name:20s} {ratio:8.2f}")
  coord_check.write_report(results, f.out)
  print(f"wrote coord_check.json and coord_check.png in {f.out}")


def run(argv=None):
  """The console script: parses `argv` (default sys.argv) and runs `main`."""
  cli.run(main, argv)


if __name__ == "__main__":
  run()
