"""Small generated tasks with checkable answers, for fine-tuning experiments.

Each task is a deterministic function of a seed returning prompt/response
examples, and names the metric that scores a model's greedy answers:

  qa         facts stated in a context, a question about one of them   -> exact match, token F1
  summarize  a short report whose key sentence is marked; summarise it  -> ROUGE-L
  translate  English number words to digits ("four hundred six" -> 406) -> chrF
  search     passages stating facts, queries paraphrasing one of them   -> recall@k, MRR
             (retrieval by embedding similarity; `search_set`)
"""

from __future__ import annotations

import numpy as np

from lmjax.data import sft
from lmjax.tasks import metrics

NAMES = [
  "Ada",
  "Ben",
  "Cleo",
  "Dan",
  "Eve",
  "Finn",
  "Gus",
  "Hana",
  "Ivo",
  "Jude",
  "Kai",
  "Lena",
  "Milo",
  "Nora",
  "Otto",
  "Pia",
  "Quin",
  "Rosa",
  "Sam",
  "Tess",
]
CITIES = [
  "Paris",
  "Rome",
  "Lima",
  "Oslo",
  "Cairo",
  "Quito",
  "Dublin",
  "Vienna",
  "Madrid",
  "Athens",
  "Berlin",
  "Prague",
  "Lisbon",
  "Warsaw",
  "Sofia",
  "Kyiv",
]
PETS = ["cat", "dog", "horse", "parrot", "rabbit", "goat", "tortoise", "hamster"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
ONES = [
  "zero",
  "one",
  "two",
  "three",
  "four",
  "five",
  "six",
  "seven",
  "eight",
  "nine",
  "ten",
  "eleven",
  "twelve",
  "thirteen",
  "fourteen",
  "fifteen",
  "sixteen",
  "seventeen",
  "eighteen",
  "nineteen",
]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
SUBJECTS = [
  "The river",
  "The old bridge",
  "The market",
  "The harvest",
  "The library",
  "The north road",
  "The mill",
  "The school",
  "The harbour",
  "The orchard",
]
EVENTS = [
  "floods in spring",
  "closes at dusk",
  "needs new stone",
  "opens on Mondays",
  "was rebuilt last year",
  "draws many travellers",
  "is short of workers",
  "sells fresh fish",
  "fails in dry years",
  "lies under snow in winter",
]


def _qa(rng) -> sft.Example:
  people = rng.choice(NAMES, 3, replace=False)
  facts = []
  for person in people:
    kind = rng.integers(3)
    if kind == 0:
      facts.append((person, f"{person} lives in {rng.choice(CITIES)}.", f"Where does {person} live?"))
    elif kind == 1:
      facts.append((person, f"{person} keeps a {rng.choice(PETS)}.", f"What pet does {person} keep?"))
    else:
      facts.append(
        (person, f"{person} likes the colour {rng.choice(COLOURS)}.", f"What colour does {person} like?")
      )
  asked = facts[rng.integers(3)]
  answer = asked[1].rstrip(".").split()[-1]
  context = " ".join(f[1] for f in facts)
  return sft.Example(f"Context: {context}\nQuestion: {asked[2]}\nAnswer:", f" {answer}\n")


def _summarize(rng) -> sft.Example:
  picks = rng.choice(len(SUBJECTS), 3, replace=False)
  sentences = [f"{SUBJECTS[i]} {EVENTS[rng.integers(len(EVENTS))]}." for i in picks]
  key = int(rng.integers(3))
  marked = [("Most important: " + s) if i == key else s for i, s in enumerate(sentences)]
  return sft.Example(f"Report: {' '.join(marked)}\nSummary:", f" {sentences[key]}\n")


def number_words(n: int) -> str:
  """English words for 0 <= n < 1000 ("four hundred six", "seventy two")."""
  words = []
  if n >= 100:
    words += [ONES[n // 100], "hundred"]
    n %= 100
    if n == 0:
      return " ".join(words)
  if n < 20:
    words.append(ONES[n])
  else:
    words.append(TENS[n // 10])
    if n % 10:
      words.append(ONES[n % 10])
  return " ".join(words)


def _translate(rng) -> sft.Example:
  n = int(rng.integers(1000))
  return sft.Example(f"Words: {number_words(n)}\nDigits:", f" {n}\n")


EVAL_SEED = 10_000  # evaluation examples come from a seed no training set uses

GENERATORS = {"qa": _qa, "summarize": _summarize, "translate": _translate}


def examples(task: str, count: int, seed: int) -> list:
  """`count` examples of built-in `task`, a pure function of (task, count, seed).

  Raises ValueError naming the known tasks for an unknown one."""
  if task not in GENERATORS:
    raise ValueError(f"finetune.task={task!r} is not a built-in task; known: {sorted(GENERATORS)}")
  rng = np.random.default_rng([seed, sorted(GENERATORS).index(task)])
  return [GENERATORS[task](rng) for _ in range(count)]


def score(task: str, predictions: list, references: list) -> dict:
  """The task's metrics, as percentages (0-100), of greedy answers (first line, stripped) against the
  references: qa -> exact_match, token_f1; summarize -> rouge_l; translate -> chrf, exact_match.
  Raises ValueError for a task without a metric."""
  preds = [p.strip().split("\n")[0].strip() for p in predictions]
  refs = [r.strip() for r in references]
  if task == "qa":
    return {
      "exact_match": 100 * float(np.mean([metrics.exact_match(p, r) for p, r in zip(preds, refs)])),
      "token_f1": 100 * float(np.mean([metrics.token_f1(p, r) for p, r in zip(preds, refs)])),
    }
  if task == "summarize":
    return {"rouge_l": 100 * float(np.mean([metrics.rouge_l(p, r) for p, r in zip(preds, refs)]))}
  if task == "translate":
    return {
      "chrf": metrics.chrf(preds, refs),
      "exact_match": 100 * float(np.mean([p == r for p, r in zip(preds, refs)])),
    }
  raise ValueError(f"no metric for task {task!r}")


SURNAMES = [
  "Stone",
  "Reed",
  "Hale",
  "Moss",
  "Lark",
  "Vane",
  "Frost",
  "Wren",
  "Birch",
  "Cole",
  "Dale",
  "Fenn",
  "Grey",
  "Holt",
  "Pike",
  "Rowe",
]


SEARCH_PAIRS = len(NAMES) * len(SURNAMES)  # distinct people, so distinct (query, passage) pairs


def search_set(count: int, seed: int) -> tuple:
  """(passages, queries, relevant): query i paraphrases passage relevant[i], in other words.

  Every person (first name + surname) appears once, so each query has exactly one right passage.
  """
  rng = np.random.default_rng([seed, 99])
  people = [f"{f} {s}" for f in NAMES for s in SURNAMES]
  if count > len(people):
    raise ValueError(f"at most {len(people)} search pairs")
  passages, queries = [], []
  for person in rng.choice(people, count, replace=False):
    if rng.integers(2):
      passages.append(f"{person} has lived in {rng.choice(CITIES)} for years.")
      queries.append(f"Which city is home to {person}?")
    else:
      passages.append(f"{person} takes care of a {rng.choice(PETS)} at home.")
      queries.append(f"What animal does {person} look after?")
  order = rng.permutation(count)
  return [passages[j] for j in order], queries, np.argsort(order)
