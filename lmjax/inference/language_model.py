"""A trained model with its tokenizer, loaded for sampling: `LanguageModel`.

    lm = LanguageModel.from_workdir("runs/shakespeare_char")
    input_ids = lm.tokenizer.encode("ROMEO:\\n")
    out = lm.generate(input_ids, max_length=50, num_return_sequences=1)
    print(lm.tokenizer.decode(out[0], skip_special_tokens=True))

`generate` follows the familiar Hugging Face shape: it returns, per sequence,
the prompt ids followed by the generated ids.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from lmjax import model, pretrained
from lmjax.core import sharding
from lmjax.data import tokenizer_base
from lmjax.inference import sampler
from lmjax.run import rundir


class LanguageModel:
  """A model (ModelConfig + params) with its tokenizer, for sampling and scoring: `generate` (Hugging Face's
  shape: prompt ids + continuation ids per sequence) and `generate_text` (strings in, continuations out)."""

  def __init__(
    self,
    cfg: model.ModelConfig,
    params,
    tokenizer: tokenizer_base.Tokenizer,
    mesh=None,
    rules=sharding.DEFAULT_RULES,
  ):
    """`mesh`: shard params and KV cache over it by the logical-axis `rules` (default: one device)."""
    rows = params["embedding"].shape[0]
    if rows != tokenizer.vocab_size:
      raise ValueError(
        f"tokenizer/checkpoint mismatch: the tokenizer has {tokenizer.vocab_size} ids but the "
        f"model's embedding has {rows} rows; load the tokenizer saved with this checkpoint"
      )
    self.tokenizer = tokenizer
    self.mesh_rules = None if mesh is None else (mesh, tuple(tuple(r) for r in rules))
    if mesh is not None and model.quantize.has_weight_containers(params):
      raise ValueError(
        "quantized (int8/int4) or decoding-layout weights run on one device; load the model in a float "
        "dtype (as declared) to shard it"
      )
    if mesh is not None:
      params = jax.device_put(params, sharding.logical_shardings(model.boxed_param_shapes(cfg), mesh, rules))
    else:  # laid out for decoding (unrolled, [N, K] matrices); on the device once, not re-uploaded
      cfg, params = model.quantize.for_decoding(cfg, params)
      params = jax.device_put(params)
    self.cfg, self.params = cfg, params

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, **kwargs) -> "LanguageModel":
    """The run's latest checkpoint (or `step`), with the run's tokenizer and architecture (a LoRA run's
    adapters merged onto the base it was trained on). Raises rundir.NoCheckpoint (a FileNotFoundError)
    when the run has no checkpoint, or not that step."""
    return cls.from_checkpoint(workdir if step is None else rundir.checkpoint_dir(workdir, step), **kwargs)

  @classmethod
  def from_checkpoint(
    cls, path: str, dtype: str | None = None, mesh=None, rules=sharding.DEFAULT_RULES, **model_overrides
  ):
    """A run directory (its latest step) or one step, RUN/checkpoints/STEP (pretrained.load_run).
    `dtype`: as in from_pretrained; `model_overrides`: ModelConfig fields to change at load
    (attention_impl, ...)."""
    cfg, params, tokenizer = pretrained.load_run(path)
    cfg, params = pretrained.with_dtype(cfg, params, dtype)
    return cls(dataclasses.replace(cfg, **model_overrides), params, tokenizer, mesh, rules)

  @classmethod
  def from_pretrained(
    cls,
    name_or_path: str,
    dtype: str | None = None,
    mesh=None,
    rules=sharding.DEFAULT_RULES,
    **model_overrides,
  ) -> "LanguageModel":
    """Anything `pretrained.load` takes: a registered name (e.g. 'smollm2-135m-instruct'), a GGUF file, a
    Hugging Face directory, or an lmjax run or checkpoint step. `dtype` (e.g. 'bfloat16') replaces the
    parameter and compute dtype (None keeps the source's); 'int8' and 'int4' quantize the weight
    matrices (model/quantize.py: fp32 activations, 4x / ~6x fewer weight bytes); `model_overrides`
    other ModelConfig fields that only change how the model runs (attention_impl, matmul_impl, ...)."""
    cfg, params, tokenizer = pretrained.load(name_or_path, dtype=dtype)
    return cls(dataclasses.replace(cfg, **model_overrides), params, tokenizer, mesh, rules)

  def chat_prompt(self, user_message: str, system: str | None = None) -> str:
    """The model's chat template applied to one user turn, ready for the assistant's answer. Encoding
    it gives control tokens for the template's markup only: the message stays text
    (tokenizer_base.ChatText)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
      {"role": "user", "content": user_message}
    ]
    return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

  def generate(
    self,
    input_ids,
    max_length: int | None = None,
    max_new_tokens: int | None = None,
    num_return_sequences: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    do_sample: bool = True,
    eos_token_id: int | None = None,
    stop_sequences=(),
    seed: int = 0,
    on_token=None,
    return_logprobs: bool = False,
    past_context: str = "auto",
  ):
    """Prompt + continuation ids, one array per (prompt, return sequence).

    `input_ids`: one prompt (list of ids) or several. `max_length` counts the prompt, `max_new_tokens`
    does not (default 50 new tokens). `do_sample=False` is greedy. `stop_sequences` are strings matched
    on the decoded continuation, wherever the tokens fall (as HF `stop_strings` and the OpenAI `stop`
    field): a row ends with the token that completes the first one. With `return_logprobs`, also
    returns each generated token's log-probability under the model. `past_context` ("auto", "crop",
    "rolling"): how tokens beyond the model's context are generated (sampler.py; auto: a rolling KV
    cache for RoPE models, nanoGPT's crop otherwise).
    """
    if any(not isinstance(s, str) or not s for s in stop_sequences):
      raise ValueError(f"stop_sequences must be non-empty strings, got {list(stop_sequences)!r}")
    if not do_sample and (top_k or top_p < 1.0):
      raise ValueError(
        f"top_k={top_k} / top_p={top_p} filter sampling, but do_sample=False (greedy) would ignore "
        "them; sample (do_sample=True, temperature > 0) or drop them"
      )
    single = len(input_ids) == 0 or np.isscalar(input_ids[0])
    prompts = [list(input_ids)] if single else [list(p) for p in input_ids]
    prompts = [p for p in prompts for _ in range(num_return_sequences)]
    if max_new_tokens is None:
      max_new_tokens = max_length - max(len(p) for p in prompts) if max_length else 50
    sampling = sampler.SamplingConfig(temperature if do_sample else 0.0, top_k, top_p, repetition_penalty)
    result = sampler.generate_tokens(
      self.cfg,
      self.params,
      prompts,
      max_new_tokens,
      sampling,
      seed=seed,
      eos_id=self.tokenizer.eos_id if eos_token_id is None else eos_token_id,
      stop_at=self._stop_at(stop_sequences) if stop_sequences else None,
      pad_id=self.tokenizer.pad_id or 0,
      on_token=on_token,
      mesh_rules=self.mesh_rules,
      past_context=past_context,
    )
    sequences = [np.asarray(p + t, np.int32) for p, t in zip(prompts, result.tokens)]
    return (sequences, result.logprobs) if return_logprobs else sequences

  def _stop_at(self, stop_strings):
    """sampler.generate_tokens' stop_at for text stop strings: the fewest generated ids whose decoded
    text contains one of them. Each row remembers how far it was checked, so each prefix is decoded
    at most once after a miss."""
    checked = {}  # decoded with special tokens shown, so a stop string may be a control token too

    def stop_at(row, ids):
      found = lambda k: any(
        s in self.tokenizer.decode(ids[:k], skip_special_tokens=False) for s in stop_strings
      )
      if not found(len(ids)):
        checked[row] = len(ids)
        return None
      return next(k for k in range(checked.get(row, 0) + 1, len(ids) + 1) if found(k))

    return stop_at

  def generate_text(self, prompts, stop_sequences=(), **kwargs) -> list:
    """Strings in, continuations (without the prompt) out, each cut before the first stop string it
    contains (the stop string itself is not returned, as with the OpenAI `stop` field and lm-eval's
    `until`)."""
    encoded = [self.tokenizer.encode(p) for p in prompts]
    outputs = self.generate(encoded, stop_sequences=stop_sequences, **kwargs)
    per_prompt = len(outputs) // len(encoded)
    texts = [self.tokenizer.decode(out[len(encoded[i // per_prompt]) :]) for i, out in enumerate(outputs)]
    return [tokenizer_base.cut_at_stop(text, stop_sequences) for text in texts]
