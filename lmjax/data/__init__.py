"""Layer `data`: text in, token batches out: tokenizers (`tokenizers.py`, `hf_tokenizer.py`), corpora
streamed by document (`sources.py`, `shakespeare.py`) through the filter stage (`filters.py`) into
token stores prepared once (`prepare.py`, `store.py`), step-indexed pretraining batches from a store
with Grain prefetch (`loader.py`), and fine-tuning examples tokenized with a loss mask (`sft.py`).

May import: `lmjax.core` only. Knows nothing of models or training.
"""
