"""GGUF export (pretrained/gguf_export.py, lmjax-export): written by the `gguf` package, read back by
lmjax's GGUF loader (an independent path: the gguf package's reader and dequantizer) to the same
logits, tokenizer and chat template. That llama.cpp itself runs the file to the same greedy tokens is
measured by benchmarks/gguf_export_llama_cpp.py (llama-cpp-python builds from source)."""

import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pretrained import needs_smollm2

from lmjax import model, pretrained
from lmjax.cli import export as export_cli
from lmjax.data import hf_tokenizer, tokenizers
from lmjax.pretrained import gguf as gguf_loader, gguf_export

LLAMA = dict(pos_encoding="rope", mlp="swiglu", norm="rmsnorm", rope_theta=50000.0, norm_eps=1e-6)


def byte_level_bpe():
  """A small byte-level BPE with GPT-2's split, trained by Hugging Face `tokenizers` (what pretrained
  models' tokenizers are), with two special tokens."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=["<|bos|>", "<|eos|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(["Hello world, the quick brown fox jumps over the lazy dog 12345."] * 20, trainer)
  template = "{% for m in messages %}<|bos|>{{ m['content'] }}<|eos|>{% endfor %}"
  return hf_tokenizer.HFTokenizer(tok, 0, 1, None, template)


def tiny_llama(tied: bool, vocab_size: int = 300, **overrides):
  shape = dict(vocab_size=vocab_size, max_len=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96)
  cfg = model.ModelConfig(tie_embeddings=tied, **{**shape, **LLAMA, **overrides})
  return cfg, model.init_params(cfg, jax.random.key(7))


def logits(cfg, params, ids):
  return np.asarray(model.Transformer(cfg).apply({"params": params}, jnp.asarray([ids], jnp.int32))[0])


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype,tolerance", [("f32", 0.0), ("f16", 2e-3), ("q8_0", 2e-2)])
def test_exported_gguf_loads_back_to_the_same_model(tmp_path, tied, dtype, tolerance):
  tokenizer = byte_level_bpe()
  cfg, params = tiny_llama(tied, tokenizer.vocab_size)
  path = str(tmp_path / "m.gguf")
  gguf_export.export(cfg, params, tokenizer, path, dtype)
  cfg2, params2, tokenizer2 = pretrained.load(path)
  fields = ("vocab_size", "max_len", "d_model", "n_layers", "n_heads", "kv_heads", "dim_per_head", "d_ff")
  fields += ("tie_embeddings", "mlp", "norm", "pos_encoding")
  assert {k: getattr(cfg2, k) for k in fields} == {k: getattr(cfg, k) for k in fields}
  assert (cfg2.rope_theta, cfg2.norm_eps) == pytest.approx(
    (cfg.rope_theta, cfg.norm_eps), rel=1e-6
  )  # float32
  text = "Hello, wörld 123! the lazy fox"
  ids = tokenizer.encode(text)
  assert len(ids) < len(text.encode()) and tokenizer2.encode(text) == ids and tokenizer2.decode(ids) == text
  assert (tokenizer2.bos_id, tokenizer2.eos_id, tokenizer2.pad_id) == (0, 1, None)
  assert tokenizer2.chat_template == tokenizer.chat_template
  ref = logits(cfg, params, ids)
  # The tolerance is the storage format's rounding, relative to the logits' range.
  np.testing.assert_allclose(logits(cfg2, params2, ids), ref, rtol=0, atol=tolerance * np.ptp(ref) + 1e-6)


def test_q8_0_export_keeps_its_blocks_when_loaded_as_int8(tmp_path):
  tokenizer = byte_level_bpe()
  cfg, params = tiny_llama(True, tokenizer.vocab_size)
  path = str(tmp_path / "m.gguf")
  gguf_export.export(cfg, params, tokenizer, path, "q8_0")
  _, params_q8, _ = pretrained.load(path, dtype="int8")
  _, params_f32, _ = pretrained.load(path)  # the gguf package's dequantization of the same blocks
  kept = model.quantize.dequantize_params(params_q8)
  for a, b in zip(jax.tree.leaves(params_f32), jax.tree.leaves(kept)):
    np.testing.assert_allclose(np.asarray(b), a, rtol=0, atol=1e-6)


def test_rope_row_permutation_is_llama_cpps():
  w = np.arange(8 * 3).reshape(8, 3)  # 2 heads of 4 rows: rotate-half rows (0, 2), (1, 3) pair up
  permuted = gguf_export.permute_rope_rows(w, 2)
  assert permuted[:4, 0].tolist() == [0, 6, 3, 9]  # head 0: rows 0, 2, 1, 3 interleaved
  np.testing.assert_array_equal(gguf_loader.unpermute_rope_rows(permuted, 2), w)


@needs_smollm2
def test_smollm2_tokenizer_survives_the_gguf_round_trip():
  _, _, tokenizer = pretrained.load("smollm2-135m-instruct")
  back = hf_tokenizer.from_gguf_metadata(**hf_tokenizer.to_gguf_metadata(tokenizer))
  for text in ["Hello world 12345", "<|im_start|>user\nHi<|im_end|>", "  spaces\tand\nnew lines ü"]:
    assert back.encode(text) == tokenizer.encode(text)
  assert back.chat_template == tokenizer.chat_template
  assert (back.bos_id, back.eos_id, back.pad_id) == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)


def test_what_gguf_cannot_express_is_refused(tmp_path):
  path, tokenizer = str(tmp_path / "m.gguf"), byte_level_bpe()
  cfg, params = tiny_llama(True, mlp="gelu")
  with pytest.raises(ValueError, match=r"model options \{'mlp': 'gelu'\} have no GGUF 'llama' equivalent"):
    gguf_export.export(cfg, params, tokenizer, path)
  cfg, params = tiny_llama(True)
  with pytest.raises(ValueError, match="dtype 'q4_0' is not supported"):
    gguf_export.export(cfg, params, tokenizer, path, "q4_0")
  for kind in ("char", "bytelevel"):
    with pytest.raises(ValueError, match=f"data.tokenizer='{kind}', fitted by lmjax.*--format=hf"):
      gguf_export.export(cfg, params, tokenizers.train(kind, "abc " * 50, 300), path)
  cfg, params = tiny_llama(True, parametrization="mup", mup_base_width=32)
  with pytest.raises(ValueError, match="'parametrization': 'mup'"):
    gguf_export.export(cfg, params, tokenizer, path)
  cfg, params = tiny_llama(True)
  with pytest.raises(ValueError, match="data.tokenizer='byte'"):
    gguf_export.export(cfg, params, tokenizers.ByteTokenizer(), path)
  assert not os.path.exists(path)


def test_export_cli_never_replaces_an_existing_output(tmp_path, capsys):
  existing = tmp_path / "model.gguf"
  existing.write_text("keep me")
  with pytest.raises(SystemExit) as exit_info:
    export_cli.run(["lmjax-export", "--model=pretrained:nothing", f"--output={existing}"])
  assert exit_info.value.code == 2
  assert "exists; choose a new path" in capsys.readouterr().err
  assert existing.read_text() == "keep me"


def test_export_cli_refuses_folders_and_leaves_nothing_when_stopped(tmp_path, capsys, monkeypatch):
  """A GGUF --output ending in / and one under a file are refused before loading; an export stopped by
  SIGTERM or failing leaves neither its staging file nor the folders it made."""
  model = str(tmp_path / "m.gguf")
  cfg, params = tiny_llama(True)
  gguf_export.export(cfg, params, byte_level_bpe(), model)
  (tmp_path / "notes.txt").write_text("keep")
  cases = {f"{tmp_path}/new/": "names a folder", f"{tmp_path}/notes.txt/x.gguf": "notes.txt is a file"}
  for output, message in cases.items():
    with pytest.raises(SystemExit) as exit_info:
      export_cli.run(["lmjax-export", f"--model=pretrained:{model}", f"--output={output}"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err

  def stopped(*_):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler's SystemExit ends this

  def failing(*_):
    raise ValueError("cannot say that")

  previous = signal.getsignal(signal.SIGTERM)
  for export, code in ((stopped, 128 + signal.SIGTERM), (failing, 2)):
    monkeypatch.setattr(gguf_export, "export", export)
    with pytest.raises(SystemExit) as exit_info:
      export_cli.run(["lmjax-export", f"--model=pretrained:{model}", f"--output={tmp_path}/a/b/m.gguf"])
    assert exit_info.value.code == code
    assert sorted(os.listdir(tmp_path)) == ["m.gguf", "notes.txt"]
  assert signal.getsignal(signal.SIGTERM) is previous


def test_export_cli_runs_off_the_main_thread(tmp_path):
  """Signal handlers can only be set on the main thread; export called from another (a notebook's
  worker, a server) still writes its file and leaves the process's SIGTERM handler alone."""
  model, output = str(tmp_path / "m.gguf"), str(tmp_path / "copy.gguf")
  cfg, params = tiny_llama(True)
  gguf_export.export(cfg, params, byte_level_bpe(), model)
  previous, exits = signal.getsignal(signal.SIGTERM), []

  def export():
    try:
      export_cli.run(["lmjax-export", f"--model=pretrained:{model}", f"--output={output}"])
      exits.append("returned")
    except SystemExit as stop:
      exits.append(stop.code)
    except BaseException as err:  # noqa: BLE001 (reported below: signal.signal's ValueError off the main thread)
      exits.append(repr(err))

  worker = threading.Thread(target=export)
  worker.start()
  worker.join()
  assert exits in (["returned"], [0], [None])
  assert signal.getsignal(signal.SIGTERM) is previous
  _, back_params, _ = pretrained.load(output)
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), params, back_params)
  assert jax.tree.all(same)
