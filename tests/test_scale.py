"""Scale-out on simulated CPU devices: mesh equivalence, real sharding, resharding restore, dry run,
and two processes with jax.distributed."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from lmjax.inference import LanguageModel

from conftest import REPO, run_lmjax, tiny_flags

_MESH_SCRIPT = r"""
import jax, numpy as np
from lmjax import model, train
from lmjax.core import sharding
from lmjax.run import checkpoint, config as config_lib
cfg = model.ModelConfig(vocab_size=24, max_len=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                        dropout=0.1)
# lr 1e-3: Adam's first step is ~lr * sign(g), so reduction-order noise in tiny gradients moves params by ~lr.
optim = config_lib.base_config().optim
optim.update(dict(lr=1e-3, min_lr=1e-4, warmup_steps=0))
optimizer, schedule = train.make_optimizer(optim, 10, train.param_roles(cfg))
tokens = np.random.default_rng(0).integers(0, 24, (8, 17)).astype(np.int32)
batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
results = {}
for shape in [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]:
  mesh = sharding.make_mesh(shape)
  abstract, shardings = train.state_shardings(cfg, optimizer, mesh, sharding.DEFAULT_RULES)
  batch_sh = sharding.batch_sharding(mesh, sharding.DEFAULT_RULES)
  state = train.init_state(cfg, optimizer, 0, shardings)
  step = train.make_train_step(cfg, optimizer, schedule, 0, 1, shardings, batch_sh)
  placed = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}
  if shape == (2, 4, 1):  # the residual stream between blocks is pinned to the batch axes
    print("constraints", step.lower(state, placed, None).as_text().count('sdy.sharding_constraint'))
  state, metrics = step(state, placed, None)
  results[shape] = (float(metrics["loss"]), jax.tree.map(np.asarray, state.params))
  if shape == (2, 2, 2):
    wq = state.params["blocks"]["attn"]["wq"]  # [layers, embed, heads, head_dim]
    print("wq", wq.sharding.spec, wq.addressable_shards[0].data.shape)
    emb = state.params["embedding"]
    print("embedding", emb.sharding.spec, emb.addressable_shards[0].data.shape)
    mu = state.opt_state[1][0].mu["blocks"]["mlp"]["w1"]
    print("adam_mu_w1", mu.sharding.spec, mu.addressable_shards[0].data.shape)
base_loss, base_params = results[(1, 1, 1)]
for shape, (loss, params) in results.items():
  pairs = zip(jax.tree.leaves(params), jax.tree.leaves(base_params))
  diff = max(float(np.abs(a - b).max()) for a, b in pairs)
  print("mesh", shape, "loss_diff", abs(loss - base_loss), "param_diff", diff)

# Resharding restore: save on 8-device FSDP, restore on 1 device, and the reverse.
import tempfile
for save_shape, load_shape in [((1, 8, 1), (1, 1, 1)), ((1, 1, 1), (2, 2, 2))]:
  workdir = tempfile.mkdtemp()
  mesh = sharding.make_mesh(save_shape)
  _, save_sh = train.state_shardings(cfg, optimizer, mesh, sharding.DEFAULT_RULES)
  saved = train.init_state(cfg, optimizer, 1, save_sh)
  ckpt = checkpoint.Checkpointer(workdir, 2)
  ckpt.save(5, saved)
  ckpt.close()
  target, _ = train.state_shardings(cfg, optimizer, sharding.make_mesh(load_shape), sharding.DEFAULT_RULES)
  ckpt = checkpoint.Checkpointer(workdir, 2)
  step, restored = ckpt.restore_latest(target)
  pairs = zip(jax.tree.leaves(saved), jax.tree.leaves(restored))
  same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)
  print("reshard", save_shape, "->", load_shape, "step", step, "equal", same,
        "devices", len(restored.params["embedding"].sharding.device_set))
  ckpt.close()
"""


@pytest.fixture(scope="module")
def mesh_run():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
    [sys.executable, "-c", _MESH_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


@pytest.mark.slow
def test_one_step_is_the_same_on_every_mesh(mesh_run):
  lines = [l for l in mesh_run.splitlines() if l.startswith("mesh")]
  assert len(lines) == 4
  for line in lines:
    loss_diff, param_diff = float(line.split("loss_diff ")[1].split()[0]), float(line.split("param_diff ")[1])
    assert loss_diff <= 1e-5 and param_diff <= 1e-5, line


@pytest.mark.slow
def test_params_and_optimizer_state_are_sharded_by_the_rules(mesh_run):
  # mesh (data 2, fsdp 2, tensor 2): embed over fsdp, heads/mlp/vocab over tensor.
  assert "wq P(None, 'fsdp', 'tensor', None) (2, 16, 2, 8)" in mesh_run
  assert "embedding P('tensor', 'fsdp') (12, 16)" in mesh_run
  assert "adam_mu_w1 P(None, 'fsdp', 'tensor') (2, 16, 24)" in mesh_run


@pytest.mark.slow
def test_activations_are_constrained_at_block_boundaries(mesh_run):
  count = int(mesh_run.split("constraints ")[1].split()[0])
  assert count >= 3  # after the embedding and after each of the 2 blocks (forward; more in backward)


@pytest.mark.slow
def test_checkpoints_restore_into_another_mesh(mesh_run):
  assert "reshard (1, 8, 1) -> (1, 1, 1) step 5 equal True devices 1" in mesh_run
  assert "reshard (1, 1, 1) -> (2, 2, 2) step 5 equal True devices 8" in mesh_run


@pytest.mark.slow
def test_dry_run_sizes_a_1b_model_without_allocating_it():
  result = run_lmjax(
    "train",
    "--config=experiments/llama_1b.py",
    "--dry_run",
    "--cpu_devices=8",
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "1.100B params on mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in result.stdout
  assert "per device: params 0.51 GiB, optimizer state 1.02 GiB" in result.stdout  # fp32, 1/8 each, Adam 2x


def start_process(flags, port: int, index: int, env, stdout) -> subprocess.Popen:
  """Process `index` of a two-process `lmjax-train` run, one CPU device each, coordinated on `port`."""
  command = [
    sys.executable,
    "-m",
    "lmjax.cli.train",
    *flags,
    f"--coordinator_address=127.0.0.1:{port}",
    "--num_processes=2",
    f"--process_id={index}",
    "--cpu_devices=1",
  ]
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=subprocess.STDOUT, text=True)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, corpus_file):
  # FSDP over the two processes: each holds half of every parameter, so the end-of-run sampling
  # needs both processes (it hung when process 0 ran it alone on the sharded params).
  data_dir = str(tmp_path / "tfds")
  common = [
    "--config.train.steps=3",
    "--config.train.log_every=1",
    "--config.train.ckpt_every=3",
    "--config.train.num_samples=1",
    "--config.mesh.shape=(1,2,1)",
    "--config.model.dropout=0.0",
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  single = run_lmjax(
    "train",
    *tiny_flags(corpus_file, data_dir, str(tmp_path / "one"), *common),
    "--cpu_devices=2",
    env=env,
    timeout=300,
  )
  assert single.returncode == 0, single.stderr[-3000:]
  port = free_port()
  two_flags = tiny_flags(corpus_file, data_dir, str(tmp_path / "two"), *common)
  procs = [start_process(two_flags, port, i, env, subprocess.PIPE) for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
  read = lambda d: [json.loads(l)["loss"] for l in open(os.path.join(d, "metrics.jsonl"))]
  one, two = read(str(tmp_path / "one")), read(str(tmp_path / "two"))
  assert len(one) == len(two) == 3 and max(abs(a - b) for a, b in zip(one, two)) <= 1e-5
  samples = [open(os.path.join(tmp_path, d, "samples.txt")).read() for d in ("one", "two")]
  assert samples[0] == samples[1] and len(samples[0]) > 1
  restored = LanguageModel.from_workdir(str(tmp_path / "two"))  # the 2-process checkpoint, in one process
  assert restored.generate(restored.tokenizer.encode("ROMEO"), max_new_tokens=3, do_sample=False)[
    0
  ].shape == (8,)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, corpus_file):
  # A preemption notice may reach one host first; a process that stopped alone would wait forever
  # in the checkpoint save the other never joins. Both must save the same step and exit 143.
  workdir = str(tmp_path / "run")
  flags = tiny_flags(
    corpus_file,
    str(tmp_path / "tfds"),
    workdir,
    "--config.train.steps=100000",
    "--config.train.log_every=2",
    "--config.train.ckpt_every=100000",
    "--config.train.num_samples=0",
    "--config.mesh.shape=(1,2,1)",
    "--config.model.dropout=0.0",
  )
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  port = free_port()
  with open(tmp_path / "p1.log", "w") as p1_log:
    procs = [start_process(flags, port, i, env, subprocess.PIPE if i == 0 else p1_log) for i in range(2)]
    for line in procs[0].stdout:
      if line.startswith("step 4/"):
        break
    procs[0].send_signal(signal.SIGTERM)
    out, _ = procs[0].communicate(timeout=180)
    procs[1].wait(timeout=180)
  assert [p.returncode for p in procs] == [143, 143], out[-2000:] + open(tmp_path / "p1.log").read()[-2000:]
  saved = int(out.split("SIGTERM received: saving step ")[1].split()[0])
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(saved)] and saved % 2 == 0
