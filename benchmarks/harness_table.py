"""SmolLM2-135M-Instruct on the local lm-eval tasks, lmjax's backend beside lm-eval's own `hf` backend
(transformers + torch fp32 on the same GGUF), same tasks, same documents, same lm-eval version:

  python benchmarks/harness_table.py --hf_python=/tmp/hfvenv/bin/python --limit=40 --out=runs/harness_table

Runs `lmjax-evaluate --model=pretrained:smollm2-135m-instruct --tasks=...` and lm-eval's CLI with
`--model hf` one after the other, each with its wall time, and writes OUT.md: one row per (task,
metric), the two backends' values side by side.
"""

import glob
import json
import os
import subprocess
import sys
import time

from absl import app, flags

from lmjax.pretrained import registry
from lmjax.tasks import harness_tasks

flags.DEFINE_string("hf_python", "/tmp/hfvenv/bin/python", "A Python with torch, transformers, lm-eval[hf].")
flags.DEFINE_integer("limit", 40, "Documents per task.")
flags.DEFINE_integer("batch_size", 16, "Requests per forward pass, both backends.")
flags.DEFINE_string("out", "runs/harness_table", "Output prefix (OUT.md, OUT_lmjax.json, OUT_hf/).")


def main(argv):
  del argv
  f = flags.FLAGS
  tasks = ",".join(harness_tasks.TASKS)
  include = harness_tasks.write()
  gguf = registry.resolve("smollm2-135m-instruct")
  os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
  start = time.time()
  subprocess.run(
    [sys.executable, "-m", "lmjax.cli.evaluate", "--model=pretrained:smollm2-135m-instruct",
     f"--tasks={tasks}", f"--limit={f.limit}", f"--batch_size={f.batch_size}", f"--output={f.out}_lmjax"],
    check=True,
  )  # fmt: skip
  ours_s = time.time() - start
  start = time.time()
  model_args = f"pretrained={os.path.dirname(gguf)},gguf_file={os.path.basename(gguf)},dtype=float32"
  subprocess.run(
    [f.hf_python, "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--tasks", tasks,
     "--include_path", include, "--limit", str(f.limit), "--batch_size", str(f.batch_size),
     "--device", "cpu", "--output_path", f.out + "_hf"],
    check=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1"},
  )  # fmt: skip
  hf_s = time.time() - start
  with open(f.out + "_lmjax.json", encoding="utf-8") as fh:
    ours = json.load(fh)["results"]
  with open(sorted(glob.glob(os.path.join(f.out + "_hf", "**", "results_*.json"), recursive=True))[-1]) as fh:
    theirs = json.load(fh)["results"]
  lines = [
    f"SmolLM2-135M-Instruct, {f.limit} documents per task, batch {f.batch_size}, this CPU",
    "",
    "| task | metric | lmjax | lm-eval `hf` (transformers) |",
    "|---|---|---:|---:|",
  ]
  for task in harness_tasks.TASKS:
    for key, value in ours[task].items():
      if "," in key and not key.split(",")[0].endswith("_stderr") and isinstance(value, float):
        other = theirs[task].get(key, float("nan"))
        lines.append(f"| {task} | {key.split(',')[0]} | {value:.4f} | {other:.4f} |")
  lines += ["", f"wall time: lmjax {ours_s:.0f} s, hf {hf_s:.0f} s (model loading and task setup included)"]
  text = "\n".join(lines) + "\n"
  with open(f.out + ".md", "w", encoding="utf-8") as fh:
    fh.write(text)
  print(text)


if __name__ == "__main__":
  app.run(main)
