"""Transparent huge pages for the host memory XLA allocates, by re-executing the process.

XLA:CPU takes every buffer of a step (activations, their transposed copies, gradients)
from glibc's malloc, which maps them with 4 KiB pages; the many memory-bound passes
over them (layout copies, norms, casts) then, by all we measured, miss the TLB. With glibc's
`glibc.malloc.hugetlb=1` tunable malloc asks the kernel for transparent huge pages
(on kernels where THP is `always` or `madvise`), and the 6x384 training step ran
1.25-1.31 s instead of 1.37-1.69 s (BUILD_NOTES, "Fifth round"). glibc reads its
tunables only when a process starts, so every entry point (lmjax/cli/__init__.py, before
any of them imports JAX) calls `reexec_with_huge_pages`: it replaces the process (same PID, same
arguments) with one that has the tunable set. Only on CPU hosts: where a GPU or TPU is present the
host's malloc is not on the step's path, so the process is left as it is, as it is with
`LMJAX_HUGE_PAGES=0`.

The tunable does not reach the arenas XLA keeps long-lived buffers in, so weights stay in 4 KiB
pages; `arrays_in_huge_pages` moves a tree of arrays (a decoding model's weights,
model/quantize.for_decoding) into one mapping advised for huge pages. JAX is imported there only,
as the re-exec must run before it.
"""

import glob
import os
import sys
import weakref

TUNABLE = "glibc.malloc.hugetlb=1"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_env(environ) -> dict | None:
  """The environment to re-execute with, or None when there is nothing to switch on."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables or not huge_pages_usable(environ):
    return None
  return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, TUNABLE)))}


def huge_pages_usable(environ) -> bool:
  """Whether host memory here should ask for transparent huge pages: not switched off
  (LMJAX_HUGE_PAGES=0), a CPU host, and a kernel whose THP setting is not `never`."""
  if environ.get("LMJAX_HUGE_PAGES") == "0" or accelerator_host(environ):
    return False
  try:
    with open(_THP_SETTING) as f:
      return "[never]" not in f.read()
  except OSError:  # not Linux, or a kernel without THP
    return False


def accelerator_host(environ) -> bool:
  """Whether JAX will run on a GPU or TPU here: JAX_PLATFORMS names one first, or (unset) an NVIDIA
  or TPU device node exists. Decided without importing JAX, which would be too late."""
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() not in ("cpu", "")
  return bool(
    glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
  )


def reexec_with_huge_pages() -> None:
  """Re-runs the current command with `TUNABLE` set; returns only if it is set already (or off)."""
  env = huge_pages_env(os.environ)
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def arrays_in_huge_pages(tree):
  """`tree` with its JAX arrays copied into one anonymous memory mapping advised for transparent huge
  pages (madvise MADV_HUGEPAGE) and handed back to JAX without a further copy (on CPU, JAX aliases
  page-aligned numpy memory). For weights a decode step streams: XLA's allocator puts them in 4 KiB
  pages (its arenas are not advised), and a SmolLM2 int8 token reads ~35,000 such pages; a chain of
  the model's int8 matrices ran 4.48-4.64 ms from 4 KiB pages and 4.06-4.09 ms from huge pages (AMD
  EPYC, session 17, BUILD_NOTES). Values, dtypes and shapes are unchanged. Only arrays held whole on
  one CPU device move (others, and non-array leaves, stay as they are). The mapping is freed with the
  last array that uses it, so one surviving array (or a jit that captured one) keeps all of it; an
  array that appears twice in `tree` is copied twice. Returns `tree` as it is where nothing can be
  advised (LMJAX_HUGE_PAGES=0, THP `never`, no MADV_HUGEPAGE, the advice refused), where it holds no
  such array, or where all of them were moved before."""
  import mmap

  import jax
  import numpy as np

  leaves, treedef = jax.tree.flatten(tree)
  indices = [i for i, x in enumerate(leaves) if _movable(x)]
  if not indices or not hasattr(mmap, "MADV_HUGEPAGE") or not huge_pages_usable(os.environ):
    return tree
  if all(_in_a_region(leaves[i]) for i in indices):  # moved before: nothing to do
    return tree
  page = mmap.PAGESIZE
  sizes = [-(-leaves[i].nbytes // page) * page for i in indices]
  region = mmap.mmap(-1, sum(sizes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
  try:
    region.madvise(mmap.MADV_HUGEPAGE)
  except OSError:  # e.g. EINVAL where a sandbox refuses the advice: keep the arrays where they are
    return tree
  start = np.frombuffer(region, np.uint8, 1).ctypes.data
  _REGIONS[id(region)] = (start, start + len(region))
  weakref.finalize(region, _REGIONS.pop, id(region), None)
  offset = 0
  for i, size in zip(indices, sizes):
    array = leaves[i]
    view = np.frombuffer(region, array.dtype, array.size, offset).reshape(array.shape)
    view[...] = np.asarray(array)
    leaves[i] = jax.device_put(view, array.sharding) if array.committed else jax.device_put(view)
    offset += size
  return jax.tree.unflatten(treedef, leaves)


def _movable(x) -> bool:
  """A non-empty array held whole on one CPU device, of a dtype numpy can view (not a PRNG key)."""
  import jax

  return (
    isinstance(x, jax.Array)
    and x.nbytes > 0
    and x.is_fully_addressable
    and len(x.devices()) == 1
    and next(iter(x.devices())).platform == "cpu"
    and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended)
  )


_REGIONS = {}  # id of each live mapping arrays_in_huge_pages made -> its (start, end) addresses


def _in_a_region(array) -> bool:
  try:
    pointer = array.unsafe_buffer_pointer()
  except Exception:  # noqa: BLE001 (sharded over several devices, or deleted): not one of ours
    return False
  # a copy: a finalizer on another thread may remove a region meanwhile
  return any(start <= pointer < end for start, end in tuple(_REGIONS.values()))
