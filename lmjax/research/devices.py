"""Which accelerators each concurrently running sweep point may use (`lmjax-sweep --parallel`).

A JAX process uses every device it can see, and on GPUs preallocates 75% of each one's memory, so
two points started side by side on one node would fight over the same devices. Each of the
`parallel` slots therefore gets its own environment: a disjoint set of `devices_per_point` devices
through CUDA_VISIBLE_DEVICES (GPU) or the TPU runtime's visible-chip variables (one chip, a 1x2 or a
2x2 block per process, as in JAX's "running multiple processes on one TPU VM" recipe), or, when the
points share the node's devices (`devices_per_point=0`), JAX's on-demand GPU allocation instead of
preallocation. The node's devices are counted from /dev without starting JAX in the sweep process
(that would take the GPUs' memory itself).
"""

from __future__ import annotations

import glob
import os
import re

# TPU_CHIPS_PER_PROCESS_BOUNDS for the chip counts one process can hold on a single TPU VM.
_TPU_CHIP_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1"}
_TPU_FIRST_PORT = 8476  # the TPU runtime's default mesh controller port; slot i uses port + i


def node_devices() -> tuple[str, list[str]]:
  """(platform, device ids) of this node: ("gpu", CUDA ids, honouring a CUDA_VISIBLE_DEVICES the
  sweep was started with), ("tpu", chip indices from /dev/accel* or /dev/vfio), or ("cpu", [])."""
  if "CUDA_VISIBLE_DEVICES" in os.environ:  # set, even to "" (no GPU visible): it is the node's list
    return "gpu", [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
  gpus = [p for p in glob.glob("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia\d+", p)]
  if gpus:
    return "gpu", [str(i) for i in range(len(gpus))]
  chips = glob.glob("/dev/accel[0-9]*") or [p for p in glob.glob("/dev/vfio/*") if p[-1].isdigit()]
  if chips:
    return "tpu", [str(i) for i in range(len(chips))]
  return "cpu", []


def _fits(count: int, parallel: int, devices_per_point: int, platform: str) -> str:
  """The settings that do fit `count` devices, keeping one of the two numbers as given."""
  fixes = [f"--parallel={count // devices_per_point}"] if count >= devices_per_point else []
  most = count // parallel
  if platform == "tpu":  # a process holds 1, 2 or 4 chips
    most = max((n for n in _TPU_CHIP_BOUNDS if n <= most), default=0)
  fixes += [f"--devices_per_point={most}"] if most else []
  return "use " + " or ".join(fixes) if fixes else f"lower both: their product must be <= {count}"


def slot_environments(platform: str, devices: list[str], parallel: int, devices_per_point: int) -> list:
  """The environment variables of each of `parallel` slots (a list of dicts, one per slot).

  `devices_per_point` > 0 gives slot i the devices [i*d, (i+1)*d) of `devices`: disjoint, and all of
  them when parallel * d == len(devices). 0 lets every slot see every device (GPU: allocation on
  demand, so one point's preallocation cannot starve the others). Raises ValueError for more devices
  than the node has, for devices per point on a CPU node, for TPU blocks other than 1, 2 or 4
  chips, and for TPU points sharing the chips (a chip serves one process)."""
  if parallel < 1 or devices_per_point < 0:
    raise ValueError(f"--parallel={parallel} must be >= 1 and --devices_per_point={devices_per_point} >= 0")
  if devices_per_point == 0:
    if platform == "tpu" and parallel > 1:
      raise ValueError(
        f"--parallel={parallel} on a TPU VM needs --devices_per_point (a TPU chip serves one process)"
      )
    shared = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"} if platform == "gpu" and parallel > 1 else {}
    return [dict(shared) for _ in range(parallel)]
  if platform == "cpu":
    raise ValueError("--devices_per_point needs GPUs or TPUs; this node has neither (found none in /dev)")
  if parallel * devices_per_point > len(devices):
    raise ValueError(
      f"--parallel={parallel} x --devices_per_point={devices_per_point} needs "
      f"{parallel * devices_per_point} devices; this node has {len(devices)} {platform.upper()}s "
      f"({','.join(devices) or 'none visible'}): "
      + _fits(len(devices), parallel, devices_per_point, platform)
    )
  if platform == "tpu" and devices_per_point not in _TPU_CHIP_BOUNDS:
    raise ValueError(
      f"--devices_per_point={devices_per_point}: a process on one TPU VM holds 1, 2 or 4 chips"
    )
  slots = []
  for i in range(parallel):
    ids = ",".join(devices[i * devices_per_point : (i + 1) * devices_per_point])
    if platform == "gpu":
      slots.append({"CUDA_VISIBLE_DEVICES": ids})
    else:
      port = str(_TPU_FIRST_PORT + i)
      slots.append(
        {
          "TPU_VISIBLE_CHIPS": ids,
          "TPU_VISIBLE_DEVICES": ids,
          "TPU_CHIPS_PER_PROCESS_BOUNDS": _TPU_CHIP_BOUNDS[devices_per_point],
          "TPU_PROCESS_BOUNDS": "1,1,1",
          "TPU_MESH_CONTROLLER_ADDRESS": f"localhost:{port}",
          "TPU_MESH_CONTROLLER_PORT": port,
        }
      )
  return slots
