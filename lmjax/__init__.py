"""lmjax: a JAX/Flax codebase to pretrain, fine-tune and sample decoder-only Transformers.

The package is laid out by layer, bottom to top; a layer imports only the layers below it (checked
by tests/test_layout.py), and each subpackage's docstring says what it owns:

  core        errors, atomic files and the directory lock, mesh and logical-axis sharding, huge pages
  ops         kernels chosen by name: attention, matmul with fp32 accumulation, dropout
  model       the Transformer: config, layers, KV cache, LoRA, parameter and FLOP accounting
  data        tokenizers, text datasets (TFDS), token streams and SFT examples with their batches
  run         the experiment config, checkpoints, and the run directory's one owner (rundir)
  pretrained  GGUF files, Hugging Face directories and lmjax runs as (config, params, tokenizer)
  inference   the sampler (prefill, KV-cache decode) and LanguageModel.generate
  tasks       what a run trains: pretraining, SFT, retrieval; losses, metrics, evaluators
  train       optimizer, train state and setup, compiled steps, the loop, preflight, metrics log
  research    sweeps and scaling-law fits over runs
  cli         the entry points: lmjax-train, -sample, -evaluate, -sweep, -scaling
"""

__version__ = "0.1.0"
