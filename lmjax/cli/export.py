"""`lmjax-export` (python -m lmjax.export): a Llama-style run or pretrained model as a GGUF file for
llama.cpp / ollama, or a Hugging Face directory.

lmjax-export --model=runs/my_llama --format=gguf --dtype=q8_0 --output=my_llama.q8_0.gguf
lmjax-export --model=pretrained:smollm2-135m-instruct --format=gguf --dtype=f16 --output=smollm2.f16.gguf
lmjax-export --model=runs/my_llama --format=hf --output=my_llama_hf/

The output is written beside its final name and moved there only when complete (a failure, or a
SIGTERM while export runs on the main thread, leaves nothing behind, not even the folders made for it);
an existing output is never replaced.
"""

import os
import shutil
import signal
import sys
import tempfile
import threading

from absl import app, flags

from lmjax import cli, pretrained
from lmjax.core import errors
from lmjax.pretrained import gguf_export, hf

flags.DEFINE_string("model", None, "An lmjax run directory, or pretrained:NAME (registered, .gguf, HF dir).")
flags.DEFINE_enum(
  "format", "gguf", ["gguf", "hf"], "gguf: one llama.cpp file; hf: a LlamaForCausalLM directory."
)
flags.DEFINE_enum("dtype", "f32", list(gguf_export.EXPORT_DTYPES), "GGUF matrices: F32, F16 or Q8_0 blocks.")
flags.DEFINE_string("output", None, "The file (gguf) or directory (hf) to write; must not exist.")


def main(argv):
  """Exports as the flags say (`run()` parses them first)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logging()
  f = flags.FLAGS
  if not f.model or not f.output:
    raise app.UsageError("give --model and --output")
  if os.path.exists(f.output):
    raise errors.UserError(f"--output={f.output} exists; choose a new path (nothing is overwritten)")
  if f.format == "hf" and f["dtype"].present:
    raise errors.UserError("--dtype is for --format=gguf; a Hugging Face export is fp32 safetensors")
  if f.format == "gguf" and f.output.endswith(("/", os.sep)):
    raise errors.UserError(f"--output={f.output} names a folder; give the GGUF file's path (e.g. model.gguf)")
  parent = os.path.dirname(os.path.abspath(f.output))
  if blocker := _file_above(parent):
    raise errors.UserError(f"--output={f.output}: {blocker} is a file, not a folder")
  cfg, params, tokenizer = pretrained.load(cli.model_source(f.model))
  made = _missing_folders(parent)
  # SIGTERM exits through `finally`, which cleans up; only the main thread may set handlers (export called
  # from another thread keeps the process's own).
  on_main = threading.current_thread() is threading.main_thread()
  stop = signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum)) if on_main else None
  staging, done = None, False
  try:
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(f.output.rstrip('/' + os.sep))}.")
    written = os.path.join(staging, "out")
    if f.format == "gguf":
      gguf_export.export(cfg, params, tokenizer, written, f.dtype)
    else:
      hf.export_llama(cfg, params, written, tokenizer)
    if os.path.exists(f.output):  # appeared while the model loaded
      raise errors.UserError(f"--output={f.output} exists now; nothing was written there")
    os.rename(written, f.output)
    done = True
  except ValueError as err:  # what the format cannot express: the user's model, named
    raise errors.UserError(f"cannot export {f.model}: {err}") from None
  except OSError as err:  # no permission, a full disk
    raise errors.UserError(f"cannot write --output={f.output}: {err}") from None
  finally:
    if on_main:
      signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # a second SIGTERM waits for the cleanup
    if staging:
      shutil.rmtree(staging, ignore_errors=True)
    for folder in [] if done else reversed(made):
      if os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)
    if on_main:
      signal.signal(signal.SIGTERM, signal.SIG_DFL if stop is None else stop)  # None: set outside Python
      signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
  size = (
    os.path.getsize(f.output)
    if f.format == "gguf"
    else sum(os.path.getsize(os.path.join(f.output, n)) for n in os.listdir(f.output))
  )
  print(f"wrote {f.output} ({size / 2**20:.1f} MiB)")


def _file_above(folder: str) -> str | None:
  """The nearest existing path on the way up to the absolute `folder` when it is a file, else None."""
  while not os.path.exists(folder):
    folder = os.path.dirname(folder)
  return None if os.path.isdir(folder) else folder


def _missing_folders(folder: str) -> list:
  """The folders `os.makedirs(folder)` would make, outermost first."""
  missing = []
  while folder and not os.path.exists(folder):
    missing.append(folder)
    folder = os.path.dirname(folder)
  return missing[::-1]


def run(argv=None) -> None:
  cli.run(main, argv)


if __name__ == "__main__":
  run()
