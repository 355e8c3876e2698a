"""Layer `run`: an experiment and what it leaves on disk: the config schema and its checks
(`config.py`; `resume.py`: what a resumed run may change), Orbax checkpoints (`checkpoint.py`), and
the run directory's one owner (`rundir.py`: config.json, model.json, tokenizer, checkpoints,
finished.json).

May import: `lmjax.core`, `lmjax.ops`, `lmjax.model`, `lmjax.data`.
"""
