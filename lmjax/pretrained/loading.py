"""One loader for every kind of weights: `load` (by name or path), `load_run` (an lmjax run, LoRA
adapters merged onto the exact base they were trained on) and `load_init` (a fine-tuning run's
`init.*`, with the provenance it records).

A LoRA run's model.json pins its base: the run directory and step, or the pretrained name, and the
base params' fingerprint (run.checkpoint.fingerprint). Loading the run loads that step and checks
the fingerprint, so adapters are never merged onto weights they were not trained on.
"""

from __future__ import annotations

import dataclasses
import glob
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lmjax import model
from lmjax.core import errors
from lmjax.data import hf_tokenizer
from lmjax.model import lora, quantize
from lmjax.pretrained import gguf, hf
from lmjax.pretrained.registry import resolve
from lmjax.run import checkpoint, rundir


class MissingBase(errors.UserError, FileNotFoundError):
  """The exact base checkpoint a LoRA run was trained on is gone."""


class BaseChanged(errors.UserError, ValueError):
  """The base a LoRA run recorded no longer has the weights (fingerprint) it was trained on."""


def load(name_or_path: str, dtype: str | None = None):
  """(ModelConfig, params, tokenizer) of a registered name, a GGUF file, a Hugging Face directory
  (config.json + *.safetensors + tokenizer.json) or an lmjax run (directory or checkpoint step).

  `dtype` (e.g. 'bfloat16', which halves memory) becomes the parameter and compute dtype; 'int8' or
  'int4' quantize the weight matrices for inference (model/quantize.py; fp32 activations); None keeps
  the source's (fp32 for GGUF and HF files, the run's own for runs). Raises errors.ConfigError for a
  name or path that is none of these, ValueError for files whose contents lmjax cannot vouch for.
  """
  hf_dir = os.path.isdir(name_or_path) and glob.glob(os.path.join(glob.escape(name_or_path), "*.safetensors"))
  path = name_or_path if hf_dir or rundir.is_run(name_or_path) else resolve(name_or_path)
  if os.path.isfile(path) and path.endswith(".gguf"):
    cfg, params, tokenizer = gguf.load(path, dtype if dtype in quantize.QUANTIZED_DTYPES else None)
  elif hf_dir:  # (an lmjax run never holds safetensors)
    cfg, params = hf.load(path)
    tokenizer = hf_tokenizer.from_hf_directory(path)
  elif rundir.is_run(path):
    cfg, params, tokenizer = load_run(path)
  else:
    raise errors.ConfigError(
      f"{path}: not a .gguf file, a Hugging Face directory (config.json + *.safetensors + "
      "tokenizer.json) or an lmjax run directory (with checkpoints/)"
    )
  return (*with_dtype(cfg, params, dtype), tokenizer)


# What `dtype` may name when loading for inference: a float dtype, or quantized weights.
INFERENCE_DTYPES = (*model.DTYPES, *quantize.QUANTIZED_DTYPES)


def with_dtype(cfg, params, dtype: str | None):
  """(cfg, params) in `dtype`: a float dtype becomes the parameter and compute dtype; 'int8'/'int4'
  quantize the weight matrices (model/quantize.py; activations fp32); None changes nothing. Raises
  errors.ConfigError for any other name."""
  if dtype is None:
    return cfg, params
  if dtype in quantize.QUANTIZED_DTYPES:  # weight-only: the activations stay fp32
    cfg = dataclasses.replace(cfg, dtype="float32", param_dtype="float32")
    return cfg, quantize.quantize_params(params, dtype)
  if dtype not in model.DTYPES:
    raise errors.ConfigError(f"dtype {dtype!r} is not supported; allowed: {list(INFERENCE_DTYPES)}")
  if quantize.has_weight_containers(params):
    params = quantize.dequantize_params(params)
  cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
  return cfg, jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def load_run(path: str):
  """(ModelConfig, params, tokenizer) of an lmjax run: its latest checkpoint, or the step `path`
  names (`RUN/checkpoints/STEP`). A LoRA run's adapters are merged onto its pinned base."""
  workdir, step = rundir.split_step_dir(path)
  params = rundir.load_params(workdir, step)  # first: a run without checkpoints says so (NoCheckpoint)
  tokenizer = rundir.load_tokenizer(workdir)
  cfg, spec = rundir.read_model(workdir)
  if spec.get("lora_scale") is not None:
    if "base" not in spec:
      print(
        f"WARNING: {workdir}/{rundir.MODEL_FILE} predates base provenance: merging the adapters onto the "
        "base's "
        f"current weights ({spec['init']}), which may not be the ones they were trained on",
        flush=True,
      )
    base = load_init(ml_collections.ConfigDict(spec["init"]), {}, pinned=spec.get("base"))[1]
    params = lora.merge(base, params, spec["lora_scale"])
  return cfg, params, tokenizer


def load_init(init_cfg, runtime: dict, pinned: dict | None = None):
  """(ModelConfig, params, tokenizer, origin) of `init.from_checkpoint` or `init.pretrained`.

  `init.from_checkpoint` is a run directory (its latest step) or one step, `RUN/checkpoints/STEP`;
  `init.pretrained` anything `load` takes (loaded in fp32). `runtime` replaces ModelConfig fields
  (dtype, dropout, ...). `origin` says exactly which weights were loaded: the run and step, or the
  pretrained name, and the params' fingerprint. With `pinned` (an origin recorded earlier) that
  step is loaded and its fingerprint verified, so a run keeps the base it started from even after
  the base run trains on. Raises errors.ConfigError without exactly one source, MissingBase when
  the pinned step is gone, BaseChanged when its weights changed.
  """
  if bool(init_cfg.from_checkpoint) == bool(init_cfg.pretrained):
    raise errors.ConfigError(
      "fine-tuning needs exactly one of init.from_checkpoint=RUN_DIR or init.pretrained=NAME"
    )
  if init_cfg.pretrained and rundir.is_run(init_cfg.pretrained):  # a run: pinned by run and step
    init_cfg = ml_collections.ConfigDict({"from_checkpoint": init_cfg.pretrained, "pretrained": ""})
  if init_cfg.pretrained:
    cfg, params, tokenizer = load(init_cfg.pretrained, dtype="float32")
    origin = {"kind": "pretrained", "name": init_cfg.pretrained}
  else:
    run_dir, step = _run_and_step(init_cfg.from_checkpoint, pinned)
    cfg, params, tokenizer = load_run(rundir.checkpoint_dir(run_dir, step))
    origin = {"kind": "run", "workdir": run_dir, "step": step}
  params = jax.tree.map(np.asarray, params)
  origin["params_sha256"] = checkpoint.fingerprint(params)
  if pinned and pinned.get("params_sha256") not in (None, origin["params_sha256"]):
    raise BaseChanged(
      f"the base weights this run was trained on ({pinned}) have changed: {origin} now has "
      f"fingerprint {origin['params_sha256'][:16]}..., not {pinned['params_sha256'][:16]}...; "
      "restore the original base (or its file) to load this run"
    )
  return dataclasses.replace(cfg, **runtime), params, tokenizer, origin


def _run_and_step(path: str, pinned: dict | None) -> tuple:
  """(run directory, step) of `init.from_checkpoint`: the pinned step, the step named in the path,
  or the run's latest."""
  if pinned:
    run_dir, step = pinned["workdir"], pinned["step"]
    if step not in rundir.steps(run_dir):
      raise MissingBase(
        f"this run was trained on step {step} of {run_dir}, which is no longer there (steps now: "
        f"{rundir.steps(run_dir)}; train.max_to_keep may have removed it). Restore that checkpoint to "
        "load this run; merging onto another step would silently give another model"
      )
    return run_dir, step
  run_dir, step = rundir.split_step_dir(path)
  if step is None:
    steps = rundir.steps(run_dir)
    if not steps:
      raise errors.ConfigError(
        f"init.from_checkpoint={run_dir}: no checkpoints in {run_dir}/checkpoints; train that "
        "run first, or point at RUN/checkpoints/STEP"
      )
    step = steps[-1]
  return run_dir, step
