"""SmolLM2-135M-Instruct under lm-eval's own `hf` backend (transformers + torch, fp32 CPU): the reference
log-likelihoods in tests/data/smollm2_harness_reference.json, and its requests/s for the speed
comparison with lmjax's backend (benchmarks/harness_speed.py).

Runs in a separate environment (torch is not an lmjax dependency):

  python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch transformers gguf "lm-eval[hf]==0.4.13"
  .venv/bin/python -c "from lmjax.tasks import harness_tasks; harness_tasks.write('/tmp/lmjax_tasks')"
  /tmp/hfvenv/bin/python benchmarks/harness_reference.py --gguf=PATH/SmolLM2-135M-Instruct.Q4_1.gguf \\
      --tasks_dir=/tmp/lmjax_tasks --out=tests/data/smollm2_harness_reference.json

transformers dequantizes the GGUF to fp32 exactly as lmjax's loader does (gguf.quants), so both
backends score the same weights. The requests: hand-written pairs (continuations that start
mid-word, and ones whose first token merges across the context/continuation boundary) and the first
`--mc_docs` documents of the local lmjax_qa_mc task, each choice one request as lm-eval builds it
(context, " " + choice).
"""

import argparse
import json
import os
import time

# (context, continuation): a word split mid-way, a space that moves to the continuation, a merge of
# "Hello" + "," into one token, digits, an empty context (the prefix token), a non-ASCII word.
PAIRS = [
  ("The capital of France is", " Paris"),
  ("The capital of France is ", "Paris"),
  ("Transfor", "mers are neural networks"),
  ("Hel", "lo, world"),
  ("Hello", ", world"),
  ("I have 12", "34 apples"),
  ("", "Once upon a time"),
  ("Question: What is 2 + 2?\nAnswer:", " 4"),
  ("La tour Eiffel est à", " Paris"),
  ("def add(a, b):\n    return", " a + b"),
]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--gguf", required=True)
  parser.add_argument("--tasks_dir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--mc_docs", type=int, default=16)
  parser.add_argument("--batch_size", type=int, default=16)
  args = parser.parse_args()

  import torch
  import transformers
  from lm_eval.api.instance import Instance
  from lm_eval.models.huggingface import HFLM

  torch.manual_seed(0)
  directory, name = os.path.split(os.path.abspath(args.gguf))
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
  lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
  with open(os.path.join(args.tasks_dir, "lmjax_qa_mc.jsonl"), encoding="utf-8") as f:
    docs = [json.loads(line) for line in f][: args.mc_docs]
  pairs = list(PAIRS) + [(d["prompt"], " " + c) for d in docs for c in d["choices"]]
  requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
  lm.loglikelihood(requests, disable_tqdm=True)  # warm-up
  times = []
  for _ in range(3):
    start = time.perf_counter()
    results = lm.loglikelihood(requests, disable_tqdm=True)
    times.append(time.perf_counter() - start)
  record = {
    "source": f"lm-eval {__import__('lm_eval').__version__} hf backend, transformers "
    f"{transformers.__version__}, torch {torch.__version__} fp32 CPU ({torch.get_num_threads()} threads), "
    f"from {name}",
    "requests": [
      {"context": c, "continuation": x, "loglikelihood": ll, "is_greedy": g}
      for (c, x), (ll, g) in zip(pairs, results)
    ],  # fmt: skip
    "seconds": times,
    "requests_per_second": [len(pairs) / t for t in times],
    "batch_size": args.batch_size,
  }
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1, ensure_ascii=False)
  print(f"{len(pairs)} requests; hf backend {min(times):.2f}-{max(times):.2f} s per pass; wrote {args.out}")


if __name__ == "__main__":
  main()
