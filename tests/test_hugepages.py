"""The huge-pages re-exec: which environment it asks for, and that a real re-exec happens once."""

import os
import subprocess
import sys

import pytest

from lmjax.core import hugepages

# THP present and not `never`, on a CPU host (a GPU or TPU host gets no huge pages from lmjax).
THP_AVAILABLE = hugepages.huge_pages_usable({})


@pytest.mark.skipif(not THP_AVAILABLE, reason="transparent huge pages are off or absent on this machine")
def test_env_adds_the_tunable_and_keeps_others():
  env = hugepages.huge_pages_env({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"})
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.hugetlb=1"}
  assert hugepages.huge_pages_env({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_nothing_to_do_when_set_or_switched_off():
  assert (
    hugepages.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
  )  # the user's choice stands
  assert hugepages.huge_pages_env({"LMJAX_HUGE_PAGES": "0"}) is None


def test_no_thp_means_no_reexec(monkeypatch, tmp_path):
  never = tmp_path / "enabled"
  never.write_text("always madvise [never]\n")
  monkeypatch.setattr(hugepages, "_THP_SETTING", str(never))
  assert hugepages.huge_pages_env({}) is None
  monkeypatch.setattr(hugepages, "_THP_SETTING", str(tmp_path / "missing"))
  assert hugepages.huge_pages_env({}) is None


@pytest.mark.slow
@pytest.mark.skipif(not THP_AVAILABLE, reason="transparent huge pages are off or absent on this machine")
def test_reexec_runs_the_same_command_once_with_the_tunable():
  script = (
    "import os, sys; print('start', flush=True); from lmjax.core import hugepages; "
    "hugepages.reexec_with_huge_pages(); print('pid', os.getpid(), os.environ['GLIBC_TUNABLES'], "
    "sys.argv[1:])"
  )
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LMJAX_HUGE_PAGES")}
  proc = subprocess.Popen([sys.executable, "-c", script, "arg1"], env=env, stdout=subprocess.PIPE, text=True)
  out, _ = proc.communicate(timeout=60)
  lines = out.splitlines()
  # Printed before the re-exec and again in the new image; then once with the tunable, same PID.
  assert lines[:2] == ["start", "start"]
  assert lines[2] == f"pid {proc.pid} glibc.malloc.hugetlb=1 ['arg1']"


def test_lmjax_commands_are_recognised_however_python_is_started():
  from lmjax import cli

  py = "/usr/bin/python3"
  for argv in (
    [py, "/venv/bin/lmjax-train", "--config=x"],
    [py, "-m", "lmjax.cli.sample"],
    [py, "-u", "-X", "importtime", "-m", "lmjax.cli.train"],
    [py, "-mlmjax.cli.evaluate"],
    [py, "-m", "lmjax.main", "--config=x"],
  ):
    assert cli._started_as_command(argv), argv
  for argv in ([py, "-m", "pytest", "tests"], [py, "-c", "import lmjax.cli"], [py, "script.py"], [py]):
    assert not cli._started_as_command(argv), argv


def _mapping_flags(pointer: int) -> list:
  """The VmFlags of the memory mapping holding `pointer` (/proc/self/smaps)."""
  start = end = None
  for line in open("/proc/self/smaps"):
    head = line.split()[0]
    if "-" in head and not head.endswith(":"):
      start, end = (int(x, 16) for x in head.split("-"))
    elif line.startswith("VmFlags") and start <= pointer < end:
      return line.split()[1:]
  raise AssertionError(f"no mapping holds {pointer:#x}")


@pytest.mark.skipif(
  not hugepages.huge_pages_usable(os.environ), reason="huge pages are off, absent or not used on this machine"
)
def test_arrays_move_into_one_mapping_advised_for_huge_pages():
  """Values, dtypes and the tree stay; every array lands in memory advised MADV_HUGEPAGE ('hg' in
  smaps' VmFlags), page-aligned, without JAX copying it again; non-array leaves stay as they are; a
  second call moves nothing."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from lmjax.ops import quantized

  rng = np.random.default_rng(0)
  weight = quantized.quantize(rng.standard_normal((64, 128)).astype(np.float32), 8, 64, (128, 64), 1)
  tree = {"x": jnp.arange(10.0), "w": weight, "half": jnp.ones((3,), jnp.bfloat16), "none": None}
  moved = hugepages.arrays_in_huge_pages(tree)
  assert jax.tree.structure(moved) == jax.tree.structure(tree)
  for before, after in zip(jax.tree.leaves(tree), jax.tree.leaves(moved)):
    assert after.dtype == before.dtype and after.shape == before.shape
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
    pointer = after.unsafe_buffer_pointer()
    assert pointer % 4096 == 0 and "hg" in _mapping_flags(pointer)
  assert hugepages.arrays_in_huge_pages(moved) is moved  # moved already: not copied again


def test_arrays_stay_where_huge_pages_are_switched_off(monkeypatch):
  import jax.numpy as jnp

  monkeypatch.setenv("LMJAX_HUGE_PAGES", "0")
  tree = {"x": jnp.arange(4.0)}
  assert hugepages.arrays_in_huge_pages(tree) is tree
