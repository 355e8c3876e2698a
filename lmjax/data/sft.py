"""Supervised fine-tuning data: prompt/response examples, tokenized into rows with a loss mask.

Examples are padded (right) to `seq_len + 1` tokens, one per row, so no
attention crosses example boundaries; the loss mask is 1 exactly on the
response tokens and the EOS after them. `pack` (opt-in, `data.packing`) puts
several examples in a row instead, with segment ids and positions restarting
per example, so attention still stays inside each example and every example's
loss is what it would be alone in its own padded row.

Truncation policy (`tokenize`), reported in counts, never silent: the EOS is
always in the row and in the loss, since a row without it teaches a model that
never stops (the failure TRL users hit). When prompt, response and EOS do not
fit, the prompt is cut from the left first, down to MIN_PROMPT_SHARE of the row
(or all of itself if shorter); then the response is cut from the right and the
EOS follows what is left of it.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

MIN_PROMPT_SHARE = 0.25  # of the row a cut prompt keeps at least (see the truncation policy)


@dataclasses.dataclass(frozen=True)
class Example:
  """One fine-tuning example: the prompt (context, not trained on) and the response (trained on)."""

  prompt: str  # a chat prompt is the template's ChatText: its markup encodes to control tokens
  response: str


@dataclasses.dataclass(frozen=True)
class SFTData:
  """Tokenized fine-tuning rows with their loss mask and what truncation cut (`tokenize`)."""

  tokens: np.ndarray  # [N, seq_len + 1] int32, right-padded, one row per example
  loss_mask: np.ndarray  # [N, seq_len + 1] float32, 1 on response tokens and EOS
  truncated: int  # examples that lost any tokens (prompt or response)
  prompts_cut: int  # examples whose prompt lost tokens from the left
  responses_cut: int  # examples whose response lost tokens from the right (its EOS kept)
  lengths: np.ndarray | None = None  # [N] int tokens of each example in its row (before padding)
  segment_ids: np.ndarray | None = None  # [N, seq_len + 1] int32, packed rows only: 1.. per example, 0 pad
  positions: np.ndarray | None = None  # [N, seq_len + 1] int32, packed rows only: restart per example


def read_jsonl(path: str, tokenizer=None) -> list:
  """Examples from JSONL: {"prompt", "response"} or {"messages": [...]} (needs a chat template).

  Every malformed line is reported with its number, and nothing is returned unless all are valid.
  """
  examples, errors = [], []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        examples.append(_parse(json.loads(line), tokenizer))
      except (json.JSONDecodeError, ValueError, KeyError, TypeError) as err:
        errors.append(f"  line {number}: {type(err).__name__}: {err}")
  if errors:
    raise ValueError(
      f"{path}: {len(errors)} malformed line(s); fix them before fine-tuning:\n" + "\n".join(errors[:20])
    )
  if not examples:
    raise ValueError(f"{path} holds no examples")
  return examples


def hold_out(examples: list, source: str) -> tuple:
  """(train, validation): the last 10% (at least one) is held out and not trained on."""
  if len(examples) < 2:
    raise ValueError(
      f"{source} has one example: give finetune.val_file, or more examples so that the last "
      "10% can be held out for validation"
    )
  held_out = max(1, len(examples) // 10)
  return examples[:-held_out], examples[-held_out:]


def _parse(record, tokenizer) -> Example:
  if not isinstance(record, dict):
    raise ValueError("each line must be a JSON object")
  if "messages" in record:
    messages = record["messages"]
    if not messages or messages[-1].get("role") != "assistant":
      raise ValueError("'messages' must end with an assistant message (the response to learn)")
    if tokenizer is None or not getattr(tokenizer, "chat_template", ""):
      raise ValueError("'messages' needs a tokenizer with a chat template; use prompt/response instead")
    return Example(
      tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True), messages[-1]["content"]
    )
  if not isinstance(record.get("prompt"), str) or not isinstance(record.get("response"), str):
    raise ValueError("expected string fields 'prompt' and 'response' (or 'messages')")
  return Example(record["prompt"], record["response"])


def tokenize(examples, tokenizer, seq_len: int) -> SFTData:
  """Rows of `seq_len + 1` tokens: prompt, response, EOS, padding, by the module's truncation policy."""
  row = seq_len + 1
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
  tokens = np.full((len(examples), row), pad, np.int32)
  mask = np.zeros((len(examples), row), np.float32)
  prompts_cut = responses_cut = truncated = 0
  lengths = np.zeros(len(examples), np.int64)
  for i, ex in enumerate(examples):
    prompt, response = tokenizer.encode(ex.prompt), tokenizer.encode(ex.response)
    min_prompt = min(len(prompt), max(1, math.ceil(MIN_PROMPT_SHARE * row)))
    keep_prompt = max(min_prompt, row - len(response) - len(eos))
    cut = False
    if len(prompt) > keep_prompt:
      prompt, prompts_cut, cut = prompt[len(prompt) - keep_prompt :], prompts_cut + 1, True
    room = row - len(prompt) - len(eos)
    if len(response) > room:
      response, responses_cut, cut = response[:room], responses_cut + 1, True
    truncated += cut
    ids = prompt + response + eos
    tokens[i, : len(ids)] = ids
    mask[i, len(prompt) : len(ids)] = 1.0
    lengths[i] = len(ids)
  return SFTData(tokens, mask, truncated, prompts_cut, responses_cut, lengths)


def pack(sft: SFTData, pad_id: int = 0) -> SFTData:
  """The examples of `sft` packed into rows in order (a row takes the next example while it fits,
  else a new row starts), with segment ids (1, 2, ... per example; 0 on padding) and positions
  restarting at 0 per example. Fewer rows, the same examples and loss mask."""
  row = sft.tokens.shape[1]
  groups, current, used = [], [], 0
  for i, n in enumerate(sft.lengths):
    if current and used + n > row:
      groups.append(current)
      current, used = [], 0
    current, used = current + [i], used + int(n)
  groups += [current] if current else []
  tokens = np.full((len(groups), row), pad_id, np.int32)
  mask = np.zeros((len(groups), row), np.float32)
  segment_ids = np.zeros((len(groups), row), np.int32)
  positions = np.zeros((len(groups), row), np.int32)
  for r, group in enumerate(groups):
    at = 0
    for segment, i in enumerate(group, start=1):
      n = int(sft.lengths[i])
      tokens[r, at : at + n], mask[r, at : at + n] = sft.tokens[i, :n], sft.loss_mask[i, :n]
      segment_ids[r, at : at + n], positions[r, at : at + n] = segment, np.arange(n)
      at += n
  return dataclasses.replace(
    sft, tokens=tokens, loss_mask=mask, lengths=None, segment_ids=segment_ids, positions=positions
  )


def tokens_per_row(sft: SFTData) -> float:
  """Mean input tokens per row that are not padding (a row's inputs are its first seq_len tokens)."""
  seq_len = sft.tokens.shape[1] - 1
  if sft.segment_ids is not None:
    return float((sft.segment_ids[:, :-1] > 0).sum(axis=1).mean())
  return float(np.minimum(sft.lengths, seq_len).mean())


def batch_at(
  sft: SFTData, seed: int, step: int, batch_size: int, process_index: int = 0, process_count: int = 1
) -> dict:
  """This process's rows for `step` as {inputs, targets: int32 [B, T], mask: float32 [B, T]} with
  B = batch_size / process_count and T = seq_len: epochs of a seeded permutation of the examples, a
  pure function of (seed, step). batch_size must divide by process_count (preflight checks it)."""
  n = len(sft.tokens)
  flat = np.arange(step * batch_size, (step + 1) * batch_size)
  epochs = flat // n
  order = {int(e): np.random.default_rng([seed, int(e)]).permutation(n) for e in np.unique(epochs)}
  rows = np.array([order[int(e)][i % n] for e, i in zip(epochs, flat)])
  per = batch_size // process_count
  rows = rows[process_index * per : (process_index + 1) * per]
  tokens, mask = sft.tokens[rows], sft.loss_mask[rows]
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask[:, 1:]}
  if sft.segment_ids is not None:  # packed: no target across examples (one with an empty prompt)
    segments = sft.segment_ids[rows]
    batch["mask"] = batch["mask"] * (segments[:, :-1] == segments[:, 1:])
    batch["segment_ids"], batch["positions"] = segments[:, :-1], sft.positions[rows][:, :-1]
  return batch
