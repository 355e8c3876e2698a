"""lmjax: a JAX/Flax codebase to pretrain, fine-tune and sample decoder-only Transformers."""
__version__ = "0.1.0"
