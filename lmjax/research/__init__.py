"""Layer `research`: experiments over runs: sweeps (`sweep.py`: grids, random search, SLURM) and
scaling-law fits (`scaling.py`).

May import: `core`, `model`, `run`, `train` (its metrics log). Runs training as subprocesses.
"""
