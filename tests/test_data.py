"""Tokenizer tests: round trips, saved and loaded kinds, batch encoding (stores: test_store.py)."""

import json

import numpy as np
import pytest

from lmjax.data import (
  bytelevel_bpe,
  hf_export,
  hf_tokenizer,
  shakespeare,
  tokenizer_base,
  tokenizers,
)

from conftest import is_utf8

CHINESE = "什么是人工智能？"
ODD_TEXTS = [
  CHINESE,
  "emoji 🙂👍🏽 and café",
  "  two  spaces\tand tabs\n\n",
  "数学公式 $PE_{(i,2j)} = \\sin(i)$",
  "",
]


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_byte_tokenizer_round_trips(text):
  tok = tokenizers.ByteTokenizer()
  ids = tok.encode(text)
  assert ids == list(text.encode("utf-8"))
  assert tok.decode(ids + [tok.eos_id]) == text


@pytest.fixture(scope="module")
def bpe():
  return tokenizers.train("bpe", shakespeare.shakespeare_text()[:300_000], vocab_size=1000)


@pytest.mark.parametrize("text", ODD_TEXTS + ["To be, or not to be: that is the question"])
def test_bpe_tokenizer_round_trips(bpe, text):
  assert bpe.decode(bpe.encode(text)) == text


def test_bpe_learns_merges_and_saves(bpe, tmp_path):
  assert bpe.vocab_size == 1000
  sample = "What is the matter, my lord?"
  assert len(bpe.encode(sample)) < len(sample) / 2  # merges compress English
  bpe.save(str(tmp_path))
  assert (tmp_path / "tokenizer.model").exists()
  assert tokenizers.load(str(tmp_path)).encode(CHINESE) == bpe.encode(CHINESE)


def test_char_tokenizer_names_unknown_characters(tmp_path):
  tok = tokenizers.train("char", "hello world")
  assert tok.vocab_size == 8 and tok.decode(tok.encode("hello")) == "hello"
  with pytest.raises(ValueError, match="'人'.*'什'") as err:
    tok.encode(CHINESE)
  assert "'o'" not in str(err.value)
  tok.save(str(tmp_path))
  assert tokenizers.load(str(tmp_path)).encode("low") == tok.encode("low")


def test_unknown_tokenizer_kind():
  with pytest.raises(ValueError, match="data.tokenizer='word'.*allowed values"):
    tokenizers.train("word", "text")


def test_every_tokenizer_kind_implements_the_protocol_and_loads_back(bpe, tmp_path):
  """char, byte, bpe and hf tokenizers all satisfy data.tokenizer_base.Tokenizer and come back from
  what they save with the same ids (the hf one is a two-token byte-level BPE built from GGUF-style
  metadata)."""
  hf = hf_tokenizer.from_gguf_metadata(
    [chr(c) for c in range(256)] + ["<|im_end|>"], [1] * 256 + [3], [], "gpt2", "gpt2", -1, 256, -1, ""
  )
  bytelevel = tokenizers.train("bytelevel", "abc abc a " * 50, vocab_size=270)
  for tok in (tokenizers.CharTokenizer("abc \n"), tokenizers.ByteTokenizer(), bpe, bytelevel, hf):
    assert isinstance(tok, tokenizer_base.Tokenizer), tok.kind
    directory = tmp_path / tok.kind
    tok.save(str(directory))
    again = tokenizers.load(str(directory))
    assert (again.kind, again.vocab_size, again.encode("abc a")) == (
      tok.kind,
      tok.vocab_size,
      tok.encode("abc a"),
    )


@pytest.mark.parametrize(
  "text", ODD_TEXTS + ["To be, or not to be:\nthat is \u2581 the question", "a<|endoftext|>b <eos>"]
)
def test_encode_batch_equals_encode_for_every_kind(bpe, text):
  """Preparation's vectorised batch encoding gives exactly the ids of `encode`."""
  char = tokenizers.CharTokenizer("".join(ODD_TEXTS) + "To be, or not t:\nhaqus\u2581<|>ndofxt")
  bytelevel = tokenizers.train("bytelevel", "To be, or not to be " * 50, vocab_size=300)
  for tok in (char, tokenizers.ByteTokenizer(), bpe, bytelevel):
    got = tok.encode_batch([text, text[::-1]])
    assert [g.dtype for g in got] == [np.int32, np.int32]
    assert [list(g) for g in got] == [tok.encode(text), tok.encode(text[::-1])]


def _llama_style_tokenizer():
  """A SentencePiece-style tokenizer.json as Llama's: U+2581 for spaces, <0xNN> byte-fallback pieces."""
  from tokenizers import Tokenizer, decoders, models, normalizers

  vocab = {f"<0x{b:02X}>": b for b in range(256)}
  vocab |= {c: 256 + i for i, c in enumerate("\u2581abcdefghijklmnopqrstuvwxyzé")}
  hf = Tokenizer(models.BPE(vocab, [], byte_fallback=True))
  hf.normalizer = normalizers.Replace(" ", "\u2581")
  hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
  return hf_tokenizer.HFTokenizer(hf, None, None, None)


@pytest.mark.parametrize("text", ODD_TEXTS + ["é\u2581 to be", "a<|im_end|>"])
def test_token_bytes_join_to_each_texts_utf8_for_every_kind(bpe, text):
  """Each id's token_bytes, joined, are the text's UTF-8 bytes (what OpenAI's logprobs `bytes` are
  for), for every kind and for Hugging Face tokenizers with GPT-2's byte-level decoder, a char
  vocabulary's plain one (U+2581 is a character there) and Llama's byte-fallback one (there the
  `tokenizers` library's decoding is the reference); texts with a character split over tokens (CJK,
  emoji) have ids whose bytes are no UTF-8 text alone."""
  fit = "".join(ODD_TEXTS) * 3 + "é\u2581 to be a<|im_end|>"
  char = tokenizers.CharTokenizer(fit)
  bytelevel = tokenizers.train("bytelevel", fit * 20, vocab_size=300)
  splitting = [tokenizers.ByteTokenizer(), bpe, _llama_style_tokenizer()]  # no merges over CJK or emoji
  merging = [char, bytelevel, hf_export.as_hf(bytelevel), hf_export.as_hf(char)]
  for tok in merging + splitting:
    ids = tok.encode(text)
    pieces = [tok.token_bytes(i) for i in ids]
    # Llama's decoder reads a U+2581 typed in the text as a space: its library's decode is the reference
    expected = tok.decode(ids) if tok is splitting[-1] else text
    assert b"".join(pieces) == expected.encode("utf-8"), (tok.kind, ids)
    if tok in splitting and any(ord(c) >= 0x3000 for c in text):  # CJK, emoji
      assert any(not is_utf8(p) for p in pieces), tok.kind


def test_token_bytes_of_special_ids_are_their_names():
  bytelevel = tokenizers.train("bytelevel", "abc abc a " * 50, vocab_size=270)
  assert bytelevel.token_bytes(bytelevel.eos_id) == b"<|endoftext|>"
  byte = tokenizers.ByteTokenizer()
  assert [byte.token_bytes(i) for i in (byte.bos_id, byte.eos_id)] == [b"<bos>", b"<eos>"]
  hf = hf_tokenizer.from_gguf_metadata(
    [chr(c) for c in range(256)] + ["<|im_end|>"], [1] * 256 + [3], [], "gpt2", "gpt2", -1, 256, -1, ""
  )
  assert hf.token_bytes(256) == b"<|im_end|>" == hf.decode([256], skip_special_tokens=False).encode()


def test_added_tokens_go_through_the_byte_level_decoder_as_the_tokenizers_library_decodes_them():
  """An added token in GPT-2's byte alphabet ("ĠĠ") reads as two spaces, as `tokenizers` decodes it."""
  from tokenizers import AddedToken

  hf = hf_tokenizer.from_gguf_metadata(
    [chr(c) for c in range(256)] + ["<|im_end|>"], [1] * 256 + [3], [], "gpt2", "gpt2", -1, 256, -1, ""
  )
  hf._tok.add_tokens([AddedToken("ĠĠ", special=False, normalized=False)])
  added = hf._tok.token_to_id("ĠĠ")
  assert hf.token_bytes(added) == b"  " == hf.decode([added]).encode()


def test_char_encode_batch_names_unknown_characters():
  with pytest.raises(ValueError, match="'z'"):
    tokenizers.CharTokenizer("abc").encode_batch(["abz"])


def test_bytelevel_bpe_learns_merges_and_is_what_nanogpt_would_encode():
  """Byte-level BPE (tiktoken): merges shorten common words; GPT-2's split keeps a word's leading
  space with it; EOS is the last id; the vocabulary stops growing when no pair repeats."""
  tok = tokenizers.train("bytelevel", "the cat sat on the mat\n" * 200, vocab_size=280)
  assert 256 + 5 < tok.vocab_size <= 280 and tok.eos_id == tok.vocab_size - 1
  assert len(tok.encode(" the cat")) == 2  # " the", " cat": merged, space attached
  assert tok.decode(tok.encode("the") + [tok.eos_id], skip_special_tokens=False) == "the<|endoftext|>"
  assert tok.encode("<|endoftext|>") != [tok.eos_id]  # text, not the control id


def test_bytelevel_split_keeps_whitespace_runs_whole_and_old_tokenizers_keep_gpt2s(tmp_path):
  """lmjax's split (bytelevel_bpe.PATTERN) keeps a run of spaces whole, so the word after it has no
  leading space; GPT-2's lookahead leaves the run's last space to the word. A tokenizer saved before
  the spec named its pattern was fitted with GPT-2's and loads with it."""
  ranks = {bytes([b]): b for b in range(256)} | {b"  ": 256, b" b": 257}
  tok = bytelevel_bpe.ByteLevelBPETokenizer(ranks)
  assert tok.encode("a  b") == [ord("a"), 256, ord("b")]  # "a", "  ", "b"
  tok.save(str(tmp_path))
  assert tokenizers.load(str(tmp_path)).encode("a  b") == [ord("a"), 256, ord("b")]
  spec_path = tmp_path / "tokenizer.json"
  spec = json.loads(spec_path.read_text())
  del spec["pattern"]
  spec_path.write_text(json.dumps(spec))
  assert tokenizers.load(str(tmp_path)).encode("a  b") == [ord("a"), ord(" "), 257]  # "a", " ", " b"


EXPORT_TEXTS = ODD_TEXTS + [
  "To be, or not to be:\nthat is  the question",
  "  indented\n\tcode()  ",
  "é\u2581",
]


def test_exported_tokenizer_json_encodes_as_lmjax_does(tmp_path):
  """char, byte and bytelevel tokenizers written as a Hugging Face tokenizer.json (what AutoTokenizer
  reads) and loaded back by the `tokenizers` library give lmjax's ids and text; the bytelevel merges
  are recovered from tiktoken's ranks. SentencePiece BPE is refused, not written wrong."""
  from tokenizers import Tokenizer

  fit = "To be, or not to be:\nthat is  the question " * 30 + "".join(EXPORT_TEXTS) * 5
  kinds = {
    "char": tokenizers.CharTokenizer(fit),
    "byte": tokenizers.ByteTokenizer(),
    "bytelevel": tokenizers.train("bytelevel", fit, vocab_size=400),
  }
  for kind, tok in kinds.items():
    hf_tokenizer.save_hf_directory(hf_export.as_hf(tok), str(tmp_path / kind))
    loaded = Tokenizer.from_file(str(tmp_path / kind / "tokenizer.json"))
    for text in EXPORT_TEXTS:
      ids = loaded.encode(text, add_special_tokens=False).ids
      assert ids == tok.encode(text), (kind, text)
      assert loaded.decode(ids) == text, (kind, text)
    config = json.loads((tmp_path / kind / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    if tok.eos_id is not None:
      assert loaded.token_to_id(config["eos_token"]) == tok.eos_id
  sentencepiece = tokenizers.train("bpe", "To be, or not to be: that is the question " * 30, vocab_size=300)
  with pytest.raises(ValueError, match="'bpe' tokenizer has no Hugging Face conversion"):
    hf_export.as_hf(sentencepiece)
