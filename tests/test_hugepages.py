"""The huge-pages re-exec: which environment it asks for, and that a real re-exec happens once."""

import os
import subprocess
import sys

import pytest

from lmjax.core import hugepages

THP_AVAILABLE = (
  os.path.exists(hugepages._THP_SETTING) and "[never]" not in open(hugepages._THP_SETTING).read()
)


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
