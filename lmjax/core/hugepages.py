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
"""

import glob
import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_env(environ) -> dict | None:
  """The environment to re-execute with, or None when there is nothing to switch on."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  if (
    environ.get("LMJAX_HUGE_PAGES") == "0" or "glibc.malloc.hugetlb" in tunables or accelerator_host(environ)
  ):
    return None
  try:
    with open(_THP_SETTING) as f:
      if "[never]" in f.read():
        return None
  except OSError:  # not Linux, or a kernel without THP
    return None
  return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, TUNABLE)))}


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
