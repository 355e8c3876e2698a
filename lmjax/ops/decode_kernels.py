"""A decode step's two kernels on a CPU, in C++ called through the XLA FFI: the matmul of a few rows
of activations by a [N, K] weight, fp32 or int8/int4 with scales (`decode_matmul.cc`), and the
attention of one query token per row over its KV cache (`decode_attention.cc`). The same library holds
the training attention kernel `flash_cpu` (`flash_attention.cc`, used by ops/flash_attention_cpu.py).

Why our own kernels: a decode step multiplies 1-16 rows by every weight matrix and reads every
layer's KV cache, and XLA:CPU has no kernel for either that runs at the memory's or the cores' rate.
With one row it fuses int8 dequantize-then-dot into a loop reading ~22 GB/s (a jitted sum reads
32-36); with 16 rows YNNPACK multiplies at 65-120 GFLOP/s of a measured 201, and int8 weights are
dequantized into an fp32 temporary first (16-row int8 step 123-126 ms, 46-47 with the kernel). Its
batched dots read every column of the cache whatever the rows hold, and with one row XLA fused the
cache update twice and copied each layer's K and V buffers twice a step. The kernels read int8 and
int4 once (through integer dots, AVX-512 VNNI's or AVX2's, where the CPU has them, rounding x to
int8 per 32 inputs as llama.cpp does; elsewhere converted to fp32 in registers); multiply 16 rows in register
tiles; take the weights that share an input (q, k and v; w1 and w3) in one call; read each row's
cache only up to its last filled slot; and share the work with helper threads of their own (as many
as XLA's intra-op threads) that poll for jobs between kernels. A/B numbers in BUILD_NOTES
(Decisions, "Decode kernels"). No library fills this seat: XNNPACK's and oneDNN's int8
GEMMs are not reachable from JAX, and Qwix / AQT lower to the same XLA dots (ops/quantized.py).

The sources are compiled once per machine with the system's C++ compiler (`c++`, or $CXX) for the
host CPU (-march=native), into $LMJAX_CACHE (default ~/.cache/lmjax)/kernels, keyed by the sources,
the compiler and its flags, and jaxlib's version (a few seconds, the first time). Without a
compiler (GCC 12+ or Clang), or with LMJAX_DECODE_KERNEL=0, `available()` is False and the callers
(ops/quantized.matmul, ops/attention.cached_attention) use XLA: the same values up to rounding order,
except that the integer path's rounding of x is gone. Any matmul over at most MAX_ROWS (16) rows of a
QuantizedWeight takes the kernel, and one in tiles (int8/int4 as `for_decoding` lays them out on a
CPU with integer dots) up to MAX_TILED_ROWS (64), so a short prompt's prefill does too. Neither kernel is
differentiable (they serve inference weights, model/quantize.py `for_decoding`); under vmap they run
once per element.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

_HERE = pathlib.Path(__file__).parent
_SOURCES = ("decode_matmul.cc", "decode_attention.cc", "flash_attention.cc")
_HEADERS = (
  "decode_kernels.h",
  "decode_matmul_fused.h",
  "decode_matmul_int_dots.h",
  "flash_attention_tiles.h",
  "flash_attention_mask.h",
)
_TARGETS = {
  "lmjax_decode_matmul": "LmjaxDecodeMatmul",
  "lmjax_decode_attention": "LmjaxDecodeAttention",
  "lmjax_flash_forward": "LmjaxFlashForward",
  "lmjax_flash_backward": "LmjaxFlashBackward",
}
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
# The kernel serves decode steps; more rows than this are a prefill or a scoring batch, where XLA's
# GEMMs (compute-bound, YNNPACK) are the better choice.
MAX_ROWS = 16
# Weights in tiles (ops/quantized.py `tile`: the decoding layout of int8 and int4 on the integer path) go to
# the kernel up to 64 rows, a short prompt's prefill too: XLA would have to read them out of tiles first.
# SmolLM2 prefill of 32 tokens, int8: XLA 120-136 ms from rows, 160 from tiles, the kernel 57; int4:
# 166-181 vs 120; at 64 tokens int8 about even (175-229 vs 178); at 128 int4's kernel is the slower (384
# vs 330-370), its nibbles are compute-bound (session 18, BUILD_NOTES). So such a prefill rounds x to
# int8 as the decode steps after it do (and as llama.cpp's prompt processing does).
MAX_TILED_ROWS = 64


def _cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("LMJAX_CACHE", pathlib.Path.home() / ".cache" / "lmjax")) / "kernels"


def _cpu_signature() -> bytes:
  """The host CPU's model and feature flags (Linux), or its platform name elsewhere."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    first = [line for line in lines if line.startswith(("model name", "flags", "Features"))][:2]
    return "".join(first).encode()
  except OSError:
    return platform.processor().encode() + platform.machine().encode()


def build() -> pathlib.Path:
  """Compiles the kernels into the kernel cache if it is not there yet; returns the library's
  path. The file appears atomically (compiled to a temporary name, then renamed), so processes that
  build at once do not read a half-written library. Raises RuntimeError with the compiler's output if
  the compiler is missing or fails."""
  compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if not compiler:
    raise RuntimeError("no C++ compiler found (set $CXX or install g++/clang++)")
  source = b"".join((_HERE / name).read_bytes() for name in (*_SOURCES, *_HEADERS))
  # -march=native: a library built on one CPU can crash another (SIGILL) if a cache is shared.
  key = hashlib.sha256(
    source + " ".join((compiler,) + _FLAGS).encode() + jaxlib.__version__.encode() + _cpu_signature()
  )
  library = _cache_dir() / f"decode_kernels-{key.hexdigest()[:16]}.so"
  if library.exists():
    return library
  library.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
    partial = pathlib.Path(scratch) / library.name
    sources = [str(_HERE / name) for name in _SOURCES]
    command = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", *sources, "-o", str(partial)]
    try:
      done = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
      raise RuntimeError(f"cannot run the C++ compiler {compiler}: {error}") from error
    if done.returncode:
      raise RuntimeError(f"compiling the decode kernels failed ({' '.join(command)}):\n{done.stderr[-2000:]}")
    os.replace(partial, library)
  return library


@functools.cache
def available() -> bool:
  """Whether the kernel is built and registered with XLA for the CPU (once per process). False when
  LMJAX_DECODE_KERNEL=0 or the build fails (logged once, with the reason)."""
  if os.environ.get("LMJAX_DECODE_KERNEL", "1") == "0":
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(build()))
  except (RuntimeError, OSError) as error:
    logging.warning("decode kernel unavailable, decoding uses XLA's dots (slower): %s", error)
    return False
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  global _HAS_INT_DOTS, _FLASH_DTYPES
  _HAS_INT_DOTS = bool(library.LmjaxDecodeIntegerDots())
  flags = library.LmjaxFlashAttentionDtypes()
  _FLASH_DTYPES = tuple(name for bit, name in ((1, "float32"), (2, "bfloat16")) if flags & bit)
  return True


_HAS_INT_DOTS = False
_FLASH_DTYPES: tuple[str, ...] = ()


def flash_attention_dtypes() -> tuple[str, ...]:
  """The operand dtypes the built flash attention kernel takes (flash_attention.cc): "float32" with
  AVX-512, "bfloat16" with AVX-512 BF16 too; () when the kernels are unavailable."""
  return _FLASH_DTYPES if available() else ()


def rounds_int8_activations() -> bool:
  """Whether the built kernel multiplies int8 and int4 weights through integer dots (AVX-512 VNNI or
  AVX2) and so rounds x to int8 per 32 inputs (False when the kernels are unavailable)."""
  return available() and _HAS_INT_DOTS


def _require():
  if not available():
    raise RuntimeError(
      "the C++ decode kernels are not available (LMJAX_DECODE_KERNEL=0, or the build failed: see the"
      " warning logged above); callers check decode_kernels.available() first"
    )


def matmul(x_MK, weights, bits: int, group_size: int, tile_rows: int = 1) -> list[jax.Array]:
  """[fp32 [M, N_i] = x_MK @ w_i^T for each weight w_i [N_i, K]], in one call that shares x (its
  conversion, and one hand-off to the helper threads) among the weights: a layer's q, k and v, or
  its w1 and w3, read as one matrix (a chain of SmolLM2's int8 matrices, 210 calls -> 120: 5.98-7.07
  -> 4.98-5.53 ms, BUILD_NOTES). `weights`: (values, scale, offset) per weight, ops/quantized.py's
  QuantizedWeight fields, all of one kind: `values` f32 [N_i, K] (bits 32, scale and offset None) or
  int8 [N_i, K] / [N_i, K // 2] (bits 8 / 4), `scale` and `offset` [N_i, K // group_size] (f32 or
  f16; offset may be None). `tile_rows` 4: integer values in quantized.tile's order (integer path only;
  the call fails with an InvalidArgument error elsewhere). x is cast to fp32; int8 and int4 on a CPU with
  AVX-512 VNNI or AVX2 round it to int8 per 32 inputs (decode_matmul_int_dots.h). CPU only (a custom
  call registered for the CPU); RuntimeError if `available()` is False."""
  _require()
  empty = jnp.zeros((0,), jnp.float32)
  results = [jax.ShapeDtypeStruct((x_MK.shape[0], values.shape[0]), jnp.float32) for values, _, _ in weights]
  operands = [empty if a is None else a for weight in weights for a in weight]
  call = jax.ffi.ffi_call("lmjax_decode_matmul", results, vmap_method="sequential")
  attrs = dict(bits=np.int32(bits), group_size=np.int64(group_size), tile_rows=np.int32(tile_rows))
  return call(x_MK.astype(jnp.float32), *operands, **attrs)


def attention(q_BNH, k_BKHS, v_BKSH, q_pos_B, k_pos_BS, window: int | None) -> jax.Array:
  """fp32 [B, N, H]: softmax(q k^T) v for one query per row, q_BNH already scaled by 1/sqrt(H), its N
  heads in K groups of N // K that share a KV head (GQA: head n reads KV head n // (N // K)). Keys
  [B, K, H, S] and values [B, K, S, H] as model/layers.py stores them; k_pos_BS each slot's position
  (-1: empty), q_pos_B the query's; a slot is seen if 0 <= k_pos <= q_pos (and q_pos - k_pos < window),
  ops/masks.position_mask's rule. A row that sees no slot gives zeros. fp32 operands only; CPU only;
  RuntimeError if `available()` is False."""
  _require()
  call = jax.ffi.ffi_call(
    "lmjax_decode_attention", jax.ShapeDtypeStruct(q_BNH.shape, jnp.float32), vmap_method="sequential"
  )
  return call(
    q_BNH.astype(jnp.float32),
    k_BKHS,
    v_BKSH,
    q_pos_B.astype(jnp.int32),
    k_pos_BS.astype(jnp.int32),
    window=np.int64(window or 0),
  )
