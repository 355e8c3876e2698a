"""Local lm-eval tasks: YAML task definitions over JSONL files this module writes, for machines with
no internet (lm-eval's standard tasks download their datasets from the Hugging Face Hub).

- `lmjax_qa_mc` (multiple_choice; acc, acc_norm): the QA generator's passages (three facts about
  three people) with the question; the choices are the facts' distinct answers, the target the one
  asked for. Chance is about 1/3.
- `lmjax_qa_gen` (generate_until; exact_match): the same questions, answered by generation up to
  the first newline, compared with the answer, whitespace removed from both.
- `lmjax_shakespeare_ppl` (loglikelihood_rolling; word_perplexity, byte_perplexity, bits_per_byte):
  passages of about 2,000 characters from the held-out tail (last 10%) of the Shakespeare corpus.

Each is an ordinary lm-eval YAML task (`dataset_path: json` with `data_files`), so `lm_eval --tasks
lmjax_qa_mc --include_path DIR` runs it with any backend. The data are generated from fixed seeds:
the same files every time.
"""

from __future__ import annotations

import json
import os

from lmjax.core import files
from lmjax.data import shakespeare
from lmjax.tasks import generators

TASKS = ("lmjax_qa_mc", "lmjax_qa_gen", "lmjax_shakespeare_ppl")
DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "lmjax", "lm_eval_tasks")
_SEED = 20261130
_PASSAGE_CHARS = 2000

_YAML = {
  "lmjax_qa_mc": """task: lmjax_qa_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
  "lmjax_qa_gen": """task: lmjax_qa_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: ['\\s']
metadata:
  version: 1.0
""",
  "lmjax_shakespeare_ppl": """task: lmjax_shakespeare_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
""",
}


def qa_documents(count: int) -> tuple:
  """(multiple-choice docs, generation docs) from the QA generator: each {"prompt", "choices",
  "label"} / {"prompt", "answer"}; the choices are the passage's distinct answers (two or three), in
  its order."""
  mc, gen = [], []
  for example in generators.examples("qa", count, _SEED):
    passage = example.prompt.split("\n")[0].removeprefix("Context: ")
    answers = list(dict.fromkeys(fact.rstrip(".").split()[-1] for fact in passage.split(". ")))
    answer = example.response.strip()  # lm-eval puts its target_delimiter (" ") before each choice
    mc.append({"prompt": example.prompt, "choices": answers, "label": answers.index(answer)})
    gen.append({"prompt": example.prompt, "answer": answer})
  return mc, gen


def shakespeare_documents(count: int) -> list:
  """`count` passages of about _PASSAGE_CHARS characters, whole lines, from the held-out tail."""
  text = shakespeare.shakespeare_text()
  tail = text[int(len(text) * 0.9) :]
  lines = tail[tail.index("\n") + 1 :].splitlines(keepends=True)
  docs, current = [], ""
  for line in lines:
    current += line
    if len(current) >= _PASSAGE_CHARS:
      docs.append({"text": current})
      current = ""
    if len(docs) == count:
      break
  return docs


def write(directory: str = DEFAULT_DIR, count: int = 200) -> str:
  """Writes the three tasks' JSONL data (`count` documents each) and YAML files into `directory`
  (created; rewritten with the same content on every call); returns the directory, lm-eval's
  `include_path`."""
  os.makedirs(directory, exist_ok=True)
  mc, gen = qa_documents(count)
  documents = {"lmjax_qa_mc": mc, "lmjax_qa_gen": gen, "lmjax_shakespeare_ppl": shakespeare_documents(count)}
  for name, docs in documents.items():
    data = os.path.join(os.path.abspath(directory), f"{name}.jsonl")
    files.write_atomic(data, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    files.write_atomic(os.path.join(directory, f"{name}.yaml"), _YAML[name].format(data=json.dumps(data)))
  return directory
