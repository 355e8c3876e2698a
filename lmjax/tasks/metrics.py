"""Task metrics: exact match and token F1 (QA), ROUGE-L (summaries), chrF (translation),
recall@k and MRR (retrieval). Pure functions of strings / rankings.

EM and F1 follow the SQuAD evaluation script's normalisation (lower case, no
punctuation, no articles, single spaces; an empty answer matches only an empty
one). ROUGE-L is the F-measure of the longest common subsequence of tokens (Lin,
2004), tokenized as Google's `rouge-score` does (lower case, runs of [a-z0-9]),
without stemming. chrF is sacrebleu's corpus chrF (character n-grams up to 6,
beta 2). Retrieval ranks count ties against the model: a passage scored equal to
the relevant one ranks above it, so a model that scores everything alike gets
the worst rank, not the luck of passage order.
"""

from __future__ import annotations

import collections
import re
import string

import numpy as np
from rouge_score import rouge_scorer

_ROUGE = rouge_scorer.RougeScorer(["rougeL"])


def normalize_answer(text: str) -> str:
  """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
  text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
  """1.0 when the normalised prediction equals the normalised reference (SQuAD EM), else 0.0."""
  return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
  """SQuAD's token F1 (0-1) between the normalised prediction and reference."""
  pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
  if not pred or not ref:
    return float(pred == ref)
  common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred), common / len(ref)
  return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
  """ROUGE-L F1 (0-1) with Google's rouge-score, the reference implementation (Lin 2004): the LCS of
  lower-cased runs of ASCII letters and digits, no stemming. Its cost (~15 us a pair) is nothing next
  to generating the answers; our own LCS matched it exactly and was dropped (BUILD_NOTES)."""
  return _ROUGE.score(reference, prediction)["rougeL"].fmeasure


def chrf(predictions: list, references: list) -> float:
  """Corpus chrF (0-100) with sacrebleu, the reference implementation."""
  import sacrebleu

  return sacrebleu.corpus_chrf(list(predictions), [list(references)]).score


def retrieval_scores(similarity_QP: np.ndarray, relevant_Q: np.ndarray, ks=(1, 5)) -> dict:
  """recall@k and MRR when query q's single relevant passage is `relevant_Q[q]`; the rank of the
  relevant passage is 1 + the number of other passages scored at least as high (ties count against)."""
  relevant_Q = np.asarray(relevant_Q)
  similarity_QP = np.nan_to_num(np.asarray(similarity_QP, np.float64), nan=-np.inf)  # NaN: the worst score
  relevant_score_Q1 = np.take_along_axis(similarity_QP, relevant_Q[:, None], axis=1)
  rank_Q = (similarity_QP >= relevant_score_Q1).sum(axis=1)  # counts the relevant passage itself once
  scores = {f"recall@{k}": float(np.mean(rank_Q <= k)) for k in ks}
  scores["mrr"] = float(np.mean(1.0 / rank_Q))
  return scores
