"""The lm-eval backend: batched log-likelihoods against an unbatched numpy scorer, rolling windows
against the windowed sum written out, generate_until's stop strings."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from lm_eval.api.instance import Instance

from lmjax import model, train
from lmjax.core import errors
from lmjax.data import tokenizers
from lmjax.inference.language_model import LanguageModel
from lmjax.tasks import harness, harness_tasks, loglikelihood
from lmjax.train import metrics_log

from conftest import REPO, tiny_config

TEXT = "the quick brown fox jumps over the lazy dog.\n" * 3
TOKENIZER = tokenizers.train("char", TEXT)
CFG = dataclasses.replace(
  model.ModelConfig(), vocab_size=TOKENIZER.vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=16
)
PARAMS = jax.jit(model.init_params, static_argnums=0)(CFG, jax.random.key(0))


def numpy_logprobs(ids, cfg=CFG, params=PARAMS):
  """log p(ids[i+1] | ids[:i+1]) for each i, from one unbatched forward pass, log-softmax in float64."""
  logits = np.asarray(model.Transformer(cfg).apply({"params": params}, np.asarray([ids[:-1]], np.int32))[0])
  logits = logits.astype(np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return logits[np.arange(len(ids) - 1), ids[1:]] - logz, logits.argmax(-1) == np.asarray(ids[1:])


def test_batched_scores_equal_an_unbatched_numpy_scorer():
  ids = TOKENIZER.encode(TEXT)
  # lengths across buckets, one past the context (cut from the left), a one-token continuation
  requests = [(ids[:3], ids[3:5]), (ids[:10], ids[10:13]), (ids[5:30], ids[30:34]), (ids[:1], ids[1:2])]
  requests += [(ids[i : i + 7], ids[i + 7 : i + 9]) for i in range(0, 40, 4)]
  # multiple choice: one context, one-token choices (one shared row) and longer ones (prefixes)
  requests += [(ids[:9], [t]) for t in sorted(set(ids))[:5]] + [(ids[:9], ids[9:12]), (ids[:9], ids[9:11])]
  got = loglikelihood.score(CFG, PARAMS, requests, batch_size=4)
  for (context, continuation), (logprob, greedy) in zip(requests, got):
    window = (context + continuation)[-(CFG.max_len + 1) :]
    logp, argmax = numpy_logprobs(window)
    n = len(continuation)
    assert logprob == pytest.approx(logp[-n:].sum(), abs=1e-4)
    assert greedy == bool(argmax[-n:].all())
  with pytest.raises(ValueError, match="loglikelihood_rolling"):
    loglikelihood.score(CFG, PARAMS, [(ids[:2], ids[2:20])])


def test_shared_rows_read_each_input_from_an_input_it_is_a_prefix_of():
  rng = np.random.default_rng(0)
  inputs = [tuple(rng.integers(0, 3, rng.integers(1, 6))) for _ in range(300)]
  owner = loglikelihood.shared_rows(inputs)
  for i, row in enumerate(owner):
    assert inputs[row][: len(inputs[i])] == inputs[i]  # a prefix of its row's input
    assert owner[row] == row  # rows are read from themselves
    extended = any(len(other) > len(inputs[i]) and other[: len(inputs[i])] == inputs[i] for other in inputs)
    assert (len(inputs[row]) > len(inputs[i])) == extended  # shared whenever some input extends it
  assert len(set(owner)) < len(inputs)


def test_packing_places_every_row_once_within_the_capacity():
  rng = np.random.default_rng(1)
  lengths = {row: int(n) for row, n in enumerate(rng.integers(1, 41, 200))}
  sequences = loglikelihood.pack(lengths, 40)
  assert sorted(r for s in sequences for r in s) == sorted(lengths)
  loads = sorted(sum(lengths[r] for r in s) for s in sequences)
  assert loads[-1] <= 40
  assert loads[0] + loads[1] > 40  # best fit opens a sequence only when no other has room: no two merge
  with pytest.raises(ValueError, match="does not fit"):
    loglikelihood.pack({0: 41}, 40)
  # 16 rows of 17 tokens: 16 sequences of 24 (384 tokens in one forward), or two rows per sequence
  # of 40: 8 sequences, 320 tokens, at most 16 * 24 // 40 = 9 per forward (no more tokens than 16 x 24)
  cfg = dataclasses.replace(CFG, max_len=128)
  length, sequences, per_forward = loglikelihood.packing(cfg, 10_000, dict.fromkeys(range(16), 17), 16)
  assert (length, len(sequences), per_forward) == (40, 8, 9)
  assert loglikelihood.packing(cfg, 10_000, dict.fromkeys(range(16), 24), 16)[0] == 24  # nothing to gain


def backend(**kwargs):
  return harness.LmjaxLM(LanguageModel(CFG, PARAMS, TOKENIZER), **kwargs)


def test_loglikelihood_moves_trailing_spaces_and_scores_the_continuation():
  lm = backend(batch_size=2)
  requests = [
    Instance("loglikelihood", {}, ("the quick ", "brown"), 0),
    Instance("loglikelihood", {}, ("", "dog"), 1),
  ]
  (with_context, _), (no_context, _) = lm.loglikelihood(requests)
  ids = TOKENIZER.encode("the quick brown")  # 15 tokens: inside the context
  expected = numpy_logprobs(ids)[0][len("the quick") - 1 :].sum()  # " brown" given "the quick"
  assert with_context == pytest.approx(expected, abs=1e-4)
  prefix = lm.prefix_token_id
  assert no_context == pytest.approx(numpy_logprobs([prefix] + TOKENIZER.encode("dog"))[0].sum(), abs=1e-4)


def test_rolling_loglikelihood_is_the_windowed_sum_written_out():
  """lm-eval's rule: the targets are cut into blocks of max_len; each block is predicted from the
  max_len tokens before its last target ([prefix] + text), and only its own targets are scored."""
  lm = backend(batch_size=3)
  text = TEXT[:70]  # 70 tokens: blocks of 16, the last one partial
  (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
  x = [lm.prefix_token_id] + TOKENIZER.encode(text)  # x[j + 1] is target j
  total, start, L = 0.0, 0, CFG.max_len
  while start < len(x) - 1:
    end = min(start + L, len(x) - 1)
    window = x[max(0, end - L) : end + 1]
    total += numpy_logprobs(window)[0][-(end - start) :].sum()
    start = end
  assert got == pytest.approx(total, abs=1e-3)


def test_generate_until_stops_before_the_first_stop_string():
  lm = backend()
  prompt = "the quick brown"
  requests = [
    Instance("generate_until", {}, (prompt, {"until": ["o"], "max_gen_toks": 8}), 0),
    Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 8}), 1),
  ]
  cut, free = lm.generate_until(requests)
  assert len(TOKENIZER.encode(free)) == 8  # no stop string: the whole length
  assert "o" not in cut and free.startswith(cut) and (cut == free or free[len(cut)] == "o")


@pytest.mark.slow
def test_multiple_choice_accuracy_equals_a_numpy_scorer_over_the_same_loglikelihoods(tmp_path):
  from lm_eval import simple_evaluate
  from lm_eval.tasks import TaskManager

  tokenizer = tokenizers.ByteTokenizer()
  cfg = dataclasses.replace(CFG, vocab_size=tokenizer.vocab_size, max_len=64)
  params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(1))
  lm = harness.LmjaxLM(LanguageModel(cfg, params, tokenizer), batch_size=8)
  directory = harness_tasks.write(str(tmp_path), count=24)
  results = simple_evaluate(
    model=lm, tasks=["lmjax_qa_mc"], task_manager=TaskManager(include_path=directory), log_samples=True
  )
  samples = results["samples"]["lmjax_qa_mc"]
  assert len(samples) == 24
  chosen = [int(np.argmax([ll for ll, _ in s["filtered_resps"]])) for s in samples]
  accuracy = float(np.mean([c == s["doc"]["label"] for c, s in zip(chosen, samples)]))
  assert results["results"]["lmjax_qa_mc"]["acc,none"] == pytest.approx(accuracy)
  for s in samples[:3]:  # and each choice's log-likelihood is the model's, scored independently
    context = s["arguments"][0][0]
    for (ctx, continuation), (ll, _) in zip([a for a in s["arguments"]], s["filtered_resps"]):
      assert ctx == context
      c_ids, x_ids = tokenizer.encode(ctx), tokenizer.encode(continuation)
      want = numpy_logprobs((c_ids + x_ids)[-(cfg.max_len + 1) :], cfg, params)[0][-len(x_ids) :].sum()
      assert ll == pytest.approx(want, abs=1e-4)


@pytest.mark.slow
def test_smollm2_loglikelihoods_equal_lm_evals_hf_backend():
  """The reference: lm-eval's own `hf` backend (transformers fp32 on the same GGUF) on the same
  requests, made by benchmarks/harness_reference.py: mid-word continuations, a first token that
  merges across the boundary, an empty context, and the local multiple-choice task's choices."""
  with open(os.path.join(REPO, "tests", "data", "smollm2_harness_reference.json"), encoding="utf-8") as f:
    reference = json.load(f)["requests"]
  lm = harness.LmjaxLM(LanguageModel.from_pretrained("smollm2-135m-instruct"), batch_size=16)
  requests = [
    Instance("loglikelihood", {}, (r["context"], r["continuation"]), i) for i, r in enumerate(reference)
  ]
  for (logprob, greedy), r in zip(lm.loglikelihood(requests, disable_tqdm=True), reference):
    assert logprob == pytest.approx(r["loglikelihood"], abs=1e-4), (r["context"], r["continuation"])
    assert greedy == r["is_greedy"]


def tensorboard_scalars(directory):
  """{tag: {step: value}} from the TensorBoard event files in `directory` (TFRecord framing: length,
  its CRC, the Event proto, its CRC), read without TensorFlow."""
  import struct

  from tensorboardX.proto import event_pb2

  scalars = {}
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset : offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


@pytest.mark.slow
def test_lm_eval_evaluator_logs_task_metrics_with_the_step(tmp_path, corpus_file):
  """cfg.evals kind lm_eval during training: lmjax_qa_mc's acc at steps 5 and 10 in metrics.jsonl,
  TensorBoard and finished.json; the final acc is the argmax over choices of log-likelihoods that an
  independent numpy forward of the final checkpoint reproduces."""
  workdir = str(tmp_path / "run")
  cfg = tiny_config(corpus_file, str(tmp_path / "tfds"), steps=10, ckpt_every=5, eval_every=5, num_samples=0)
  cfg.data.tokenizer = "byte"
  cfg.evals.harness = dict(kind="lm_eval", every=5, tasks="lmjax_qa_mc", limit=6, batch_size=4)
  train.train(cfg, workdir)
  records = metrics_log.read_metrics(workdir)  # a step's training and evaluator records merged
  logged = {r["step"]: r["harness/lmjax_qa_mc/acc"] for r in records if "harness/lmjax_qa_mc/acc" in r}
  assert sorted(logged) == [5, 10]
  assert all("harness/lmjax_qa_mc/acc_norm" in r for r in records if r["step"] in logged)
  assert not any("stderr" in k for r in records for k in r)
  tensorboard = tensorboard_scalars(os.path.join(workdir, "tensorboard"))
  assert tensorboard["harness/lmjax_qa_mc/acc"] == pytest.approx(logged)
  with open(os.path.join(workdir, "finished.json")) as f:
    assert json.load(f)["evals"]["harness/lmjax_qa_mc/acc"] == logged[10]

  with open(os.path.join(workdir, "lm_eval_harness", "step_10.json")) as f:
    samples = json.load(f)["samples"]["lmjax_qa_mc"]
  assert len(samples) == 6
  lm = LanguageModel.from_workdir(workdir)
  correct = []
  for sample in samples:
    lls = []
    for (context, continuation), (logged_ll, _) in zip(sample["arguments"], sample["filtered_resps"]):
      context_ids, continuation_ids = list(context.encode()), list(continuation.encode())  # byte tokenizer
      window = (context_ids + continuation_ids)[-(lm.cfg.max_len + 1) :]
      ll = numpy_logprobs(window, lm.cfg, lm.params)[0][-len(continuation_ids) :].sum()
      assert logged_ll == pytest.approx(ll, abs=1e-4)
      lls.append(ll)
    correct.append(int(np.argmax(lls)) == sample["doc"]["label"])
  assert logged[10] == pytest.approx(np.mean(correct))


def test_lm_eval_evaluator_refuses_a_tokenizer_that_cannot_encode_arbitrary_text(tmp_path, corpus_file):
  cfg = tiny_config(corpus_file, str(tmp_path / "tfds"))  # char tokenizer fitted on the corpus
  cfg.evals.harness = dict(kind="lm_eval", tasks="lmjax_qa_mc")
  with pytest.raises(errors.ConfigError, match="evals.harness .kind 'lm_eval'.: the run's tokenizer cannot"):
    train.train(cfg, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "config.json")
  cfg.evals.harness = dict(kind="lm_eval", tasks=" , ")
  with pytest.raises(errors.ConfigError, match="must name lm-eval tasks"):
    train.train(cfg, str(tmp_path / "run"))
