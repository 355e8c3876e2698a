"""SLURM job arrays for a sweep: one array task per point (`lmjax-sweep --emit=slurm`)."""

from __future__ import annotations

import os
import shlex

from lmjax.research import sweep


def slurm_script(
  config: str,
  sweep_dir: str,
  points: list,
  gpus: int,
  time_limit: str,
  partition: str,
  base: dict | None = None,
) -> str:
  """An sbatch job array with one task per point (re-submitting resumes unfinished points)."""
  commands = [
    " ".join(
      shlex.quote(a)
      for a in sweep.point_command(config, os.path.join(sweep_dir, sweep.point_name(p)), p, base)[1:]
    )
    for p in points
  ]
  header = [
    "#SBATCH --job-name=lmjax-sweep",
    f"#SBATCH --array=0-{len(points) - 1}",
    f"#SBATCH --gpus={gpus}",
    f"#SBATCH --time={time_limit}",
    f"#SBATCH --output={os.path.join(sweep_dir, 'slurm-%A_%a.out')}",
  ]
  if partition:
    header.append(f"#SBATCH --partition={partition}")
  body = "COMMANDS=(\n" + "\n".join(f"  {shlex.quote(c)}" for c in commands) + "\n)\n"
  return (
    "#!/bin/bash\n" + "\n".join(header) + "\n# One array task per sweep point; re-submitting resumes "
    "unfinished points.\n" + body + 'eval "python ${COMMANDS[$SLURM_ARRAY_TASK_ID]}"\n'
  )
