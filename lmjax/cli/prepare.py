r"""`lmjax-prepare` (python -m lmjax.prepare): tokenize an experiment's data into its token store now.

  lmjax-prepare --config=experiments/shakespeare_char.py
  lmjax-prepare --config=experiments/shakespeare_char.py \
      --config.data.sources='jsonl:web/*.jsonl=3;text:books/*.txt=1'

Training prepares the store on first use anyway; running this first keeps preparation (minutes to
hours on a large corpus) out of the training job and shows a progress bar (characters/s,
tokens/s). An interrupted preparation resumes from its finished shards. Prints the store's
directory and its counts.

Exit status: 0 when the store is ready; 2 for bad input (a config value, an empty or non-UTF-8 file,
a JSONL line without the text field, a full disk), printed as `error: ...`, with no partial store left.
"""

import json

from absl import app, flags

from lmjax import cli
from lmjax.cli import train as train_cli  # noqa: F401 (defines --config and the training flags)
from lmjax.data import prepare
from lmjax.run import config as config_lib
from lmjax.train import preflight


def main(argv):
  """Prepares the token store of the config's data block; prints where it is and what it holds."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logging()
  cfg = flags.FLAGS.config  # defined with the other training flags (cli/train.py)
  config_lib.validate(cfg)
  preflight.check_fields_used(cfg)  # what training would refuse, refused before preparing
  store = prepare.ensure(cfg.data)
  summary = {
    "store": store.directory,
    "tokenizer": store.manifest["tokenizer"],
    "sources": [
      {
        "spec": s["spec"],
        "filters": s["filters"],
        **{k: {n: v[n] for n in ("tokens", "documents")} for k, v in s["splits"].items()},
      }
      for s in store.manifest["sources"]
    ],
  }
  print(json.dumps(summary, indent=2))


def run(argv=None):
  """The console script: parses `argv` (default sys.argv) and runs `main`."""
  cli.run(main, argv, flags_parser=cli.parse_config_flags)


if __name__ == "__main__":
  run()
