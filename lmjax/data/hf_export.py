"""lmjax's own tokenizers as Hugging Face `tokenizers` objects, so an exported model's directory has a
tokenizer.json that transformers' AutoTokenizer (PreTrainedTokenizerFast) loads and that encodes
every text to the ids lmjax's tokenizer gives.

  char       a WordLevel model over the characters, each character its own piece, pieces fused back
  byte       the 256 bytes (GPT-2's printable byte characters) and <bos> <eos> <pad> as 256-258
  bytelevel  a BPE model whose merges are recovered from tiktoken's ranks: a token of rank r is the
             merge of the two parts byte-level BPE leaves when it may use only ranks below r (the
             conversion tiktoken-to-Hugging-Face tools use), split by the same pattern
  hf         already one

SentencePiece's `bpe` has no such conversion here (transformers' slow LlamaTokenizer reads a
SentencePiece model with other defaults); export refuses it rather than write a tokenizer that
encodes differently.
"""

from __future__ import annotations

from lmjax.data import bytelevel_bpe
from lmjax.data.hf_tokenizer import HFTokenizer


def as_hf(tokenizer) -> HFTokenizer:
  """An HFTokenizer that encodes and decodes as `tokenizer` does (module docstring). Raises
  ValueError for a kind with no conversion (SentencePiece `bpe`)."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

  if isinstance(tokenizer, HFTokenizer):
    return tokenizer
  if tokenizer.kind == "char":
    hf = Tokenizer(models.WordLevel({c: i for i, c in enumerate(tokenizer.chars)}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    return HFTokenizer(hf, None, None, None)
  char_of = {b: c for c, b in bytelevel_bpe.byte_of_char().items()}  # GPT-2's byte -> printable char
  text = lambda token: "".join(char_of[b] for b in token)
  if tokenizer.kind == "byte":
    hf = Tokenizer(models.BPE({char_of[b]: b for b in range(256)}, []))
    specials = ["<bos>", "<eos>", "<pad>"]
  elif tokenizer.kind == "bytelevel":
    ranks = tokenizer.ranks
    in_order = sorted(ranks.items(), key=lambda item: item[1])  # HF merges by list position
    merges = [tuple(text(p) for p in _last_merge(ranks, t, r)) for t, r in in_order if len(t) > 1]
    hf = Tokenizer(models.BPE({text(t): r for t, r in ranks.items()}, merges))
    specials = [bytelevel_bpe.EOS]
  else:
    raise ValueError(
      f"a {tokenizer.kind!r} tokenizer has no Hugging Face conversion here (char, byte, bytelevel and "
      "Hugging Face tokenizers export); export the model without it (tokenizer=None)"
    )
  split = (
    [pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated")]
    if tokenizer.kind == "bytelevel"
    else []
  )
  hf.pre_tokenizer = pre_tokenizers.Sequence(
    [*split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
  )
  hf.decoder = decoders.ByteLevel()
  hf.add_special_tokens([AddedToken(s, special=True) for s in specials])
  return HFTokenizer(hf, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)


def _last_merge(ranks: dict, token: bytes, rank: int) -> tuple:
  """The two parts byte-level BPE leaves of `token` when it may merge only pairs ranked below `rank`:
  the merge that made `token`."""
  parts = [bytes([b]) for b in token]
  while len(parts) > 2:
    pair_ranks = [ranks.get(parts[i] + parts[i + 1]) for i in range(len(parts) - 1)]
    best = min((r, i) for i, r in enumerate(pair_ranks) if r is not None and r < rank)
    parts[best[1] : best[1] + 2] = [parts[best[1]] + parts[best[1] + 1]]
  return parts[0], parts[1]
