"""Log-likelihood requests/s, SmolLM2-135M-Instruct on this CPU: lmjax's lm-eval backend against lm-eval's
`hf` backend (transformers + torch fp32) on the same requests, batch 16, rounds interleaved.

  python benchmarks/harness_speed.py --hf_python=/tmp/hfvenv/bin/python --rounds=3

The requests are benchmarks/harness_reference.py's (hand-written pairs plus the local multiple-choice
task's choices); each round times three passes of each backend after a warm-up pass (lmjax's first
pass compiles its bucket shapes; the hf backend's loads nothing new). The hf side runs in the given
Python (an environment with torch; see harness_reference.py).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags
from lm_eval.api.instance import Instance

from lmjax.inference.language_model import LanguageModel
from lmjax.pretrained import registry
from lmjax.tasks import harness, harness_tasks

flags.DEFINE_string(
  "hf_python", "/tmp/hfvenv/bin/python", "A Python with torch, transformers and lm-eval[hf]."
)
flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")
flags.DEFINE_integer("batch_size", 16, "Requests per forward pass, both backends.")
flags.DEFINE_integer("mc_docs", 16, "Multiple-choice documents (about 3 requests each).")


def main(argv):
  del argv
  f = flags.FLAGS
  tasks_dir = harness_tasks.write(os.path.join(tempfile.gettempdir(), "lmjax_harness_speed_tasks"))
  gguf = registry.resolve("smollm2-135m-instruct")
  script = os.path.join(os.path.dirname(__file__), "harness_reference.py")
  lm = harness.LmjaxLM(LanguageModel.from_pretrained("smollm2-135m-instruct"), batch_size=f.batch_size)
  ours, theirs = [], []
  for round_ in range(f.rounds):
    out = os.path.join(tempfile.gettempdir(), "lmjax_harness_speed_hf.json")
    subprocess.run(
      [f.hf_python, script, f"--gguf={gguf}", f"--tasks_dir={tasks_dir}", f"--out={out}",
       f"--mc_docs={f.mc_docs}", f"--batch_size={f.batch_size}"],
      check=True, capture_output=True,
    )  # fmt: skip
    with open(out, encoding="utf-8") as fh:
      hf = json.load(fh)
    theirs += hf["requests_per_second"]
    pairs = [(r["context"], r["continuation"]) for r in hf["requests"]]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    if round_ == 0:
      lm.loglikelihood(requests, disable_tqdm=True)  # compiles
    for _ in range(3):
      start = time.perf_counter()
      lm.loglikelihood(requests, disable_tqdm=True)
      ours.append(len(requests) / (time.perf_counter() - start))
    print(f"round {round_}: lmjax {ours[-3:]} hf {hf['requests_per_second']} requests/s", flush=True)
  print(
    f"{len(requests)} requests, batch {f.batch_size}: lmjax {min(ours):.1f}-{max(ours):.1f} requests/s, "
    f"hf backend {min(theirs):.1f}-{max(theirs):.1f}; ratio of medians "
    f"{sorted(ours)[len(ours) // 2] / sorted(theirs)[len(theirs) // 2]:.2f}",
    file=sys.stdout,
  )


if __name__ == "__main__":
  app.run(main)
