r"""A GPT-2-style byte-level BPE, encoded by tiktoken (the tokenizer of nanoGPT's prepare.py).

Text is split by `PATTERN`, each piece's UTF-8 bytes are merged by rank (lowest first), so any
text round-trips and no text encodes to the special id. Merges are learned with the `tokenizers`
library's BpeTrainer on the same pre-split pieces; a token's rank is its id (the trainer numbers
tokens in merge order, bytes first), which is exactly the rank tiktoken merges by. `<|endoftext|>`
(the last id) is EOS and separates documents in a token store. Encoding runs in tiktoken's Rust
threads on all cores: the fastest byte-level BPE on this machine (BUILD_NOTES: data preparation).
Sennrich et al. 2016 (BPE); Radford et al. 2019 (byte-level, the pattern).

`PATTERN` is GPT-2's split without its one lookahead (`\s+(?!\S)`, which leaves a whitespace run's
last space to the next word). Without it tiktoken runs the pattern on the `regex` crate's automaton
instead of fancy-regex's backtracking: 27 vs 14 MB/s of prose per thread. The splits differ only after
a run of two or more whitespace characters (the next word then has no leading space); an 8192-id BPE
fitted with each compresses held-out prose to 3.360 vs 3.360 and Python source to 2.737 vs 2.735 bytes
per token (`python benchmarks/data_pipeline.py --what=split`). Tokenizers saved before this change keep
GPT-2's pattern (the spec names the pattern).
"""

from __future__ import annotations

import base64
import concurrent.futures
import os

import numpy as np

from lmjax.data.tokenizer_base import join_runs, write_spec

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+"""
EOS = "<|endoftext|>"
_RANKS_FILE = "bytelevel.tiktoken"


def byte_of_char() -> dict:
  """GPT-2's reversible map from the 256 bytes to printable characters, inverted (char -> byte)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[chr(b)] = b
    else:
      chars[chr(256 + extra)] = b
      extra += 1
  return chars


class ByteLevelBPETokenizer:
  """Byte-level BPE of `len(ranks) + 1` ids (module docstring); `ranks` maps token bytes to ids,
  `pattern` splits text before merging."""

  kind = "bytelevel"
  bos_id = pad_id = None

  def __init__(self, ranks: dict, pattern: str = PATTERN):
    import tiktoken

    self.ranks, self.pattern = ranks, pattern
    self.eos_id = len(ranks)
    self._threads = None  # encode_batch's pool, made on first use
    self._enc = tiktoken.Encoding(
      "lmjax-bytelevel", pat_str=pattern, mergeable_ranks=ranks, special_tokens={EOS: self.eos_id}
    )

  @classmethod
  def train(cls, text: str, vocab_size: int, pattern: str = PATTERN) -> "ByteLevelBPETokenizer":
    """Merges learned from `text` split by `pattern`, up to `vocab_size` ids (256 bytes + merges + EOS;
    fewer when no pair of the text repeats any more). Raises ValueError for a vocabulary that cannot
    hold the 256 bytes and EOS."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    if vocab_size < 258:
      raise ValueError(f"data.vocab_size={vocab_size}: a byte-level BPE needs 256 byte ids + EOS + merges")
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
    )
    trainer = trainers.BpeTrainer(
      vocab_size=vocab_size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    lines = (line for line in text.splitlines(keepends=True))
    learner.train_from_iterator(lines, trainer)
    byte_of = byte_of_char()
    vocab = sorted(learner.get_vocab().items(), key=lambda item: item[1])
    return cls({bytes(byte_of[c] for c in token): i for i, (token, _) in enumerate(vocab)}, pattern)

  @property
  def vocab_size(self) -> int:
    return self.eos_id + 1

  def encode(self, text: str) -> list:
    return self._enc.encode_ordinary(text)

  def encode_batch(self, texts) -> list:
    """`encode` of each text as int32 arrays, a thread per core (tiktoken releases the GIL), straight
    into numpy (no Python list of ints in between: ~1.5x faster on a corpus)."""
    if self._threads is None:
      self._threads = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1)
    return list(self._threads.map(self._encode_array, texts))

  def _encode_array(self, text: str):
    return self._enc.encode_to_numpy(text, disallowed_special=()).astype(np.int32)

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return join_runs(
      [int(i) for i in ids],
      lambda i: i == self.eos_id,
      lambda run: self._enc.decode_bytes(run).decode("utf-8", "replace"),
      lambda i: "" if skip_special_tokens else EOS,
    )

  def token_bytes(self, token_id: int) -> bytes:
    return self._enc.decode_single_token_bytes(int(token_id))

  def save(self, directory: str) -> None:
    """tiktoken's rank file (base64 token, rank per line) and the spec naming it and the pattern."""
    os.makedirs(directory, exist_ok=True)
    lines = [f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in self.ranks.items()]
    with open(os.path.join(directory, _RANKS_FILE), "w", encoding="ascii") as f:
      f.writelines(sorted(lines, key=lambda line: int(line.split()[1])))
    write_spec(directory, {"kind": self.kind, "ranks_file": _RANKS_FILE, "pattern": self.pattern})

  @classmethod
  def load(cls, directory: str, spec: dict) -> "ByteLevelBPETokenizer":
    ranks = {}
    with open(os.path.join(directory, spec["ranks_file"]), encoding="ascii") as f:
      for line in f:
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return cls(ranks, spec.get("pattern", GPT2_PATTERN))  # saved before `pattern` was recorded: GPT-2's
