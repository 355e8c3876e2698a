"""Layer `inference`: sampling: jit-compiled prefill and KV-cache decode (`sampler.py`) and
`LanguageModel` (`language_model.py`), a model with its tokenizer and an HF-style `generate`.

May import: `core`, `ops`, `model`, `data`, `run`, `pretrained`.
"""

from lmjax.inference.language_model import LanguageModel

__all__ = ["LanguageModel"]
