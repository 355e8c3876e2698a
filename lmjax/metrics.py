"""Task metrics: exact match and token F1 (QA), ROUGE-L (summaries), chrF (translation),
recall@k and MRR (retrieval). Pure functions of strings / rankings.

EM and F1 follow the SQuAD evaluation script's normalisation (lower case, no
punctuation, no articles, single spaces). ROUGE-L is the F-measure of the
longest common subsequence of tokens (Lin, 2004). chrF is sacrebleu's corpus
chrF (character n-grams up to 6, beta 2).
"""
from __future__ import annotations

import collections
import re
import string

import numpy as np


def normalize_answer(text: str) -> str:
  text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
  pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
  if not pred or not ref:
    return float(pred == ref)
  common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred), common / len(ref)
  return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list, b: list) -> int:
  row = [0] * (len(b) + 1)
  for x in a:
    diagonal = 0
    for j, y in enumerate(b, 1):
      diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
  return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
  """ROUGE-L F1 over lower-cased whitespace tokens."""
  pred, ref = prediction.lower().split(), reference.lower().split()
  lcs = _lcs_length(pred, ref)
  if lcs == 0:
    return 0.0
  precision, recall = lcs / len(pred), lcs / len(ref)
  return 2 * precision * recall / (precision + recall)


def chrf(predictions: list, references: list) -> float:
  """Corpus chrF (0-100) with sacrebleu, the reference implementation."""
  import sacrebleu
  return sacrebleu.corpus_chrf(list(predictions), [list(references)]).score


def retrieval_scores(similarity_QP: np.ndarray, relevant_Q: np.ndarray, ks=(1, 5)) -> dict:
  """recall@k and MRR when query q's single relevant passage is `relevant_Q[q]`."""
  order_QP = np.argsort(-similarity_QP, axis=1, kind="stable")
  rank_Q = np.argmax(order_QP == np.asarray(relevant_Q)[:, None], axis=1) + 1
  scores = {f"recall@{k}": float(np.mean(rank_Q <= k)) for k in ks}
  scores["mrr"] = float(np.mean(1.0 / rank_Q))
  return scores
