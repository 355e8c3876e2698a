"""Layer `data`: text in, token batches out: tokenizers (`tokenizers.py`), text datasets prepared
with TFDS (`text_datasets.py`, `shakespeare.py`), pretraining token streams and their step-indexed
batches (`corpus.py`), and fine-tuning examples tokenized with a loss mask (`sft.py`).

May import: `lmjax.core` only. Knows nothing of models or training.
"""
