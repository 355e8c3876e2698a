"""AdamW, Lion, Adafactor and Muon on the default character-level Shakespeare config (2000 steps of
12 x 64 characters, warmup-cosine), each at its own best learning rate from a 4-point grid (a factor
of 2 apart, centred where each optimizer's scale puts it):

  lmjax-sweep --config=experiments/optimizers_shakespeare.py --workdir=runs/optimizers

writes the sweep's table and plots plus optimizers.md (best lr and val loss per optimizer; a best
lr at the edge of its grid is marked, since the optimum may lie beyond it). Everything else is the
default config, weight decay 0.1 included; Muon's AdamW branch (embeddings, head, norms, biases)
runs at muon_adam_lr = 2e-3. 16 points, about 30 minutes on a 2-core CPU.
"""

import csv
import os

from lmjax.run import config

LRS = {
  "adamw": [1e-3, 2e-3, 4e-3, 8e-3],
  "lion": [1.25e-4, 2.5e-4, 5e-4, 1e-3],  # Lion's sign update wants ~3-10x less (Chen et al. 2023)
  "adafactor": [1.25e-2, 2.5e-2, 5e-2, 1e-1],  # relative to each parameter's RMS (optax's default)
  "muon": [5e-3, 1e-2, 2e-2, 4e-2],
}
MUON_ADAM_LR = 2e-3


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"optimizers_shakespeare has no variants, got {variant!r}")
  cfg = config.load_experiment(__file__.replace("optimizers_shakespeare.py", "shakespeare_char.py"))
  cfg.train.update(num_samples=0)
  return cfg


def get_sweep():
  points = []
  for name, lrs in LRS.items():
    for lr in lrs:
      point = {"optim.name": name, "optim.lr": lr}
      if name == "muon":
        point["optim.muon_adam_lr"] = MUON_ADAM_LR
      points.append(point)
  return points


def analyze_sweep(sweep_dir: str) -> None:
  with open(os.path.join(sweep_dir, "results.csv"), newline="") as f:
    rows = [r for r in csv.DictReader(f) if r["final_val_loss"]]
  lines = ["| optimizer | best lr | final val loss | lr grid (final val loss) |", "|---|---:|---:|---|"]
  for name, lrs in LRS.items():
    mine = {float(r["optim.lr"]): float(r["final_val_loss"]) for r in rows if r["optim.name"] == name}
    if not mine:
      continue
    best = min(mine, key=mine.get)
    edge = " (grid edge)" if best in (lrs[0], lrs[-1]) else ""
    grid = ", ".join(f"{lr:g}: {mine[lr]:.4f}" if lr in mine else f"{lr:g}: -" for lr in lrs)
    lines.append(f"| {name} | {best:g}{edge} | {mine[best]:.4f} | {grid} |")
  text = "\n".join(lines) + "\n"
  with open(os.path.join(sweep_dir, "optimizers.md"), "w") as f:
    f.write(text)
  print(text)
