"""Fine-tuning: loss mask, truncation, LoRA, metrics, JSONL errors, an SFT run end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lmjax import model, pretrained, train
from lmjax.data import sft as sft_lib, tokenizers
from lmjax.model import lora as lora_lib
from lmjax.run import checkpoint, config as config_lib
from lmjax.tasks import evaluators, generators, losses, metrics

from conftest import tiny_config


def test_loss_mask_covers_response_only_with_zero_prompt_gradient():
  tok = tokenizers.ByteTokenizer()
  sft = sft_lib.tokenize([sft_lib.Example("Q: 2+2?\nA:", " 4")], tok, seq_len=16)
  ids, mask = sft.tokens[0], sft.loss_mask[0]
  prompt_len = len("Q: 2+2?\nA:")
  assert list(ids[: prompt_len + 3]) == list(b"Q: 2+2?\nA: 4") + [tok.eos_id]
  assert mask.tolist() == [0] * prompt_len + [1, 1, 1] + [0] * (17 - prompt_len - 3)
  batch = sft_lib.batch_at(sft, seed=0, step=0, batch_size=1)
  logits = jax.random.normal(jax.random.key(0), (1, 16, tok.vocab_size))
  loss, grad = jax.value_and_grad(losses.cross_entropy)(logits, batch["targets"], batch["mask"])
  # Independent: numpy mean of -log softmax over the masked-in target positions.
  logp = np.asarray(jax.nn.log_softmax(logits[0]))
  picked = [-logp[t, batch["targets"][0, t]] for t in range(16) if batch["mask"][0, t]]
  assert float(loss) == pytest.approx(np.mean(picked), rel=1e-6)
  grad_rows = np.abs(np.asarray(grad[0])).sum(-1)
  assert np.all(grad_rows[batch["mask"][0] == 0] == 0) and np.all(grad_rows[batch["mask"][0] == 1] > 0)


def test_long_prompts_are_cut_from_the_left_and_counted():
  tok = tokenizers.ByteTokenizer()
  sft = sft_lib.tokenize(
    [sft_lib.Example("x" * 30 + "END:", " ok"), sft_lib.Example("short:", " ok")], tok, 12
  )
  assert (sft.truncated, sft.prompts_cut, sft.responses_cut) == (1, 1, 0)
  # 13 tokens per row: the 4 response tokens (" ok" + EOS) keep only the last 9 prompt bytes.
  assert bytes(sft.tokens[0][:12].tolist()) == b"xxxxxEND: ok" and sft.tokens[0][12] == tok.eos_id
  assert sft.loss_mask[0].tolist() == [0] * 9 + [1] * 4


def test_truncation_keeps_the_eos_and_reports_each_cut():
  tok = tokenizers.ByteTokenizer()
  # seq_len 16: rows of 17; a cut prompt keeps at least ceil(17 / 4) = 5 tokens.
  examples = [
    sft_lib.Example("Q: hi\nA:", " " + "a long answer " * 3),  # prompt -> 5, response -> 11, EOS
    sft_lib.Example("Question: what?\nA:", " ten chars"),  # prompt -> 6, response whole
    sft_lib.Example("Q: ok\nA:", " yes"),
  ]  # fits
  sft = sft_lib.tokenize(examples, tok, seq_len=16)
  assert (sft.truncated, sft.prompts_cut, sft.responses_cut) == (2, 2, 1)
  expected = [(b"hi\nA:", b" a long ans"), (b"what?\nA:"[-6:], b" ten chars"), (b"Q: ok\nA:", b" yes")]
  for row, mask, (prompt, response) in zip(sft.tokens, sft.loss_mask, expected):
    ids = list(prompt + response) + [tok.eos_id]
    assert (
      row[: len(ids)].tolist() == ids
    )  # the EOS is in every row, right after what is kept of the response
    assert mask.tolist() == [0] * len(prompt) + [1] * (len(response) + 1) + [0] * (17 - len(ids))


def test_validation_is_held_out_not_trained_on():
  examples = [sft_lib.Example(f"p{i}", f"r{i}") for i in range(25)]
  train_part, val_part = sft_lib.hold_out(examples, "data.jsonl")
  assert train_part == examples[:23] and val_part == examples[23:]
  with pytest.raises(ValueError, match="one example"):
    sft_lib.hold_out(examples[:1], "data.jsonl")


@pytest.mark.slow
def test_bad_jsonl_lines_are_reported_and_the_run_does_not_start(tmp_path, corpus_file):
  path = tmp_path / "train.jsonl"
  path.write_text(
    '{"prompt": "a", "response": "b"}\n{"prompt": "a"}\nnot json\n{"prompt": "c", "response": "d"}\n'
    '{"messages": [{"role": "user", "content": "hi"}]}\n',
    encoding="utf-8",
  )
  with pytest.raises(
    ValueError, match=r"(?s)3 malformed line\(s\).*line 2:.*line 3: JSONDecodeError.*line 5:"
  ):
    sft_lib.read_jsonl(str(path))
  data_dir = str(tmp_path / "tfds")
  train.train(
    tiny_config(corpus_file, data_dir, steps=2, num_samples=0, ckpt_every=2), str(tmp_path / "base")
  )
  cfg = tiny_config(corpus_file, data_dir, steps=2)
  cfg.init.from_checkpoint = str(tmp_path / "base")
  cfg.finetune.train_file = str(path)
  with pytest.raises(ValueError, match="malformed"):
    train.train(cfg, str(tmp_path / "ft"))
  assert not os.path.exists(tmp_path / "ft" / "checkpoints")


def tiny_llama():
  cfg = model.ModelConfig(vocab_size=19, max_len=16, d_model=16, n_layers=2, n_heads=2, d_ff=24, mlp="swiglu")
  return cfg, model.init_params(cfg, jax.random.key(0))


@pytest.mark.slow
def test_lora_at_init_leaves_logits_unchanged():
  cfg, params = tiny_llama()
  lora = lora_lib.lora_init(params, ["q", "k", "v", "o", "mlp"], rank=4, rng=jax.random.key(1))
  tokens = jnp.arange(10)[None] % 19
  apply = lambda p: model.Transformer(cfg).apply({"params": p}, tokens)
  np.testing.assert_array_equal(apply(lora_lib.merge(params, lora, 2.0)), apply(params))
  assert set(lora["blocks"]["attn"]) == {"wq", "wk", "wv", "wo"} and set(lora["blocks"]["mlp"]) == {
    "w1",
    "w2",
    "w3",
  }
  assert lora["blocks"]["attn"]["wo"]["a"].shape == (2, 16, 4)  # wo's input is heads x head_dim


def test_merged_weights_equal_unmerged_adapter_path():
  cfg = model.ModelConfig(vocab_size=19, max_len=16, d_model=16, n_layers=1, n_heads=2, d_ff=24, mlp="relu")
  x = jax.random.normal(jax.random.key(2), (1, 5, 16))
  mlp = model.MLP(cfg)
  params = nn.unbox(mlp.init(jax.random.key(3), x)["params"])
  lora = lora_lib.lora_init(params, ["mlp"], rank=3, rng=jax.random.key(4))
  lora = jax.tree.map(lambda a: a + 0.1, lora)  # non-zero B
  merged = mlp.apply({"params": lora_lib.merge(params, lora, 0.5)}, x)[0]
  p, l, xn = jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, lora), np.asarray(x[0])
  h = np.maximum(0, xn @ p["w1"] + 0.5 * (xn @ l["w1"]["a"]) @ l["w1"]["b"])  # adapters as a side path
  expected = h @ p["w2"] + 0.5 * (h @ l["w2"]["a"]) @ l["w2"]["b"]
  np.testing.assert_allclose(merged, expected, atol=1e-5)


@pytest.mark.slow
def test_lora_training_changes_only_adapters(tmp_path, corpus_file):
  data_dir = str(tmp_path / "tfds")
  base_dir = str(tmp_path / "base")
  base_cfg = tiny_config(corpus_file, data_dir, steps=4, num_samples=0, ckpt_every=4)
  base_cfg.data.tokenizer = "byte"
  train.train(base_cfg, base_dir)
  jsonl = tmp_path / "sft.jsonl"
  jsonl.write_text(
    "".join(
      json.dumps({"prompt": f"Words: {generators.number_words(n)}\nDigits:", "response": f" {n}"}) + "\n"
      for n in range(40)
    ),
    encoding="utf-8",
  )
  cfg = tiny_config(corpus_file, data_dir, steps=6, num_samples=2, ckpt_every=6, eval_every=6)
  cfg.init.from_checkpoint = base_dir
  cfg.finetune.update(train_file=str(jsonl), mode="lora", lora_rank=2, lora_targets="q,v")
  train.train(cfg, str(tmp_path / "ft"))
  saved = checkpoint.load_params(str(tmp_path / "ft" / "checkpoints" / "6"))
  leaves = jax.tree_util.tree_flatten_with_path(saved)[0]
  assert {str(path[-1].key) for path, _ in leaves} == {"a", "b"}  # only adapters are checkpointed
  # End-of-run samples continue held-out prompts in the training format, not train.sample_prompt.
  samples = (tmp_path / "ft" / "samples.txt").read_text().split("\n\n==========\n\n")
  assert [s.split("\nDigits:")[0] for s in samples] == [
    f"Words: {generators.number_words(n)}" for n in (36, 37)
  ]
  # MFU counts the work of a LoRA step: the frozen base's forward and input gradient (4 FLOPs per
  # matmul weight and token), all three for the adapters (6), attention as in pretraining.
  m = config_lib.model_config(cfg, 259)  # the byte tokenizer's vocabulary, tied embedding
  adapters = sum(int(np.prod(v.shape)) for _, v in leaves)
  weights = model.param_count(m)  # tied: the embedding is the output matmul, counted once
  hand = 4 * weights + 6 * adapters + 12 * m.n_layers * 32 * m.n_heads * m.dim_per_head
  logged = [json.loads(line) for line in open(tmp_path / "ft" / "metrics.jsonl") if '"mfu"' in line][-1]
  assert logged["mfu"] * 1e12 / logged["tokens_per_sec"] == pytest.approx(hand, rel=1e-9)
  assert any(np.abs(np.asarray(v)).max() > 0 for path, v in leaves if path[-1].key == "b")  # B moved from 0
  base = pretrained.load(base_dir)[1]  # as declared (LanguageModel holds the decoding layout)
  tuned = pretrained.load(str(tmp_path / "ft"))[1]  # base + merged adapters
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), base, tuned)
  flat = {
    "/".join(str(k.key) for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(changed)[0]
  }
  assert {k for k, v in flat.items() if v} == {"blocks/attn/wq", "blocks/attn/wv"}


@pytest.mark.slow
def test_full_finetuning_on_a_task_writes_before_after_table(tmp_path, corpus_file):
  data_dir = str(tmp_path / "tfds")
  base_cfg = tiny_config(corpus_file, data_dir, steps=2, num_samples=0, ckpt_every=2, seq_len=64)
  base_cfg.data.tokenizer = "byte"
  train.train(base_cfg, str(tmp_path / "base"))
  cfg = tiny_config(corpus_file, data_dir, steps=40, num_samples=0, eval_every=20, seq_len=48)
  cfg.init.from_checkpoint = str(tmp_path / "base")
  cfg.finetune.update(task="translate", num_train=200, num_val=16, num_eval=8)
  train.train(cfg, str(tmp_path / "ft"))
  with open(tmp_path / "ft" / "task_eval.json") as f:
    results = json.load(f)
  assert set(results) == {"before", "after"} and {"chrf", "exact_match"} <= set(results["after"])
  records = [json.loads(line) for line in open(tmp_path / "ft" / "metrics.jsonl")]
  losses = [r["loss"] for r in records if "loss" in r]
  assert losses[-1] < losses[0]
  scores = {r["step"]: r["translate/chrf"] for r in records if "translate/chrf" in r}  # logged with the step
  assert scores == {0: results["before"]["chrf"], 40: results["after"]["chrf"]}
  assert "| after fine-tuning |" in (tmp_path / "ft" / "task_eval.md").read_text()


def test_metrics_on_hand_computed_examples():
  assert metrics.exact_match("The Cat!", "cat") == 1.0 and metrics.exact_match("a dog", "cat") == 0.0
  assert metrics.token_f1("the cat sat", "cat sat down") == pytest.approx(0.8)  # P=1, R=2/3
  assert metrics.token_f1("dog", "cat") == 0.0
  assert metrics.rouge_l("a b c d", "a c d e") == pytest.approx(0.75)  # LCS a c d: P = R = 3/4
  assert metrics.rouge_l("x y", "a b") == 0.0
  assert metrics.chrf(["four hundred"], ["four hundred"]) == pytest.approx(100.0)
  assert metrics.chrf(["abc"], ["xyz"]) == pytest.approx(0.0)
  sim = np.array([[0.9, 0.1, 0.3], [0.2, 0.1, 0.8], [0.5, 0.6, 0.4]])
  scores = metrics.retrieval_scores(sim, np.array([0, 0, 2]), ks=(1, 2))
  # ranks of the relevant passage: 1, 2, 3
  assert scores == pytest.approx({"recall@1": 1 / 3, "recall@2": 2 / 3, "mrr": (1 + 1 / 2 + 1 / 3) / 3})


def test_task_generators_are_correct_and_deterministic():
  assert [generators.number_words(n) for n in (0, 7, 13, 40, 72, 100, 110, 406, 999)] == [
    "zero",
    "seven",
    "thirteen",
    "forty",
    "seventy two",
    "one hundred",
    "one hundred ten",
    "four hundred six",
    "nine hundred ninety nine",
  ]
  assert generators.examples("qa", 5, 1) == generators.examples("qa", 5, 1) != generators.examples("qa", 5, 2)
  for ex in generators.examples("qa", 20, 3):
    answer = ex.response.strip()
    assert answer in ex.prompt.split("Question:")[0]  # the answer is stated in the context
  for ex in generators.examples("summarize", 20, 3):
    key = ex.prompt.split("Most important: ")[1].split(".")[0] + "."
    assert ex.response.strip() == key


@pytest.mark.slow
def test_search_embeddings_are_mean_pooled_hidden_states():
  cfg, params = tiny_llama()
  tok = tokenizers.CharTokenizer("abcdefghijklmnopqr")  # 18 ids < vocab 19
  texts = ["abc", "hello", "ab"]
  emb = evaluators.embed(cfg, params, tok, texts)
  for text, e in zip(texts, emb):  # independent: each text alone, unpadded, mean over its tokens
    hidden = model.Transformer(cfg).apply(
      {"params": params}, jnp.asarray([tok.encode(text)]), return_hidden=True
    )[0]
    pooled = np.asarray(hidden).mean(0)
    np.testing.assert_allclose(e, pooled / np.linalg.norm(pooled), atol=1e-5)
  passages, queries, relevant = generators.search_set(8, 0)
  for q, r in zip(queries, relevant):
    assert q.split()[-1].rstrip("?") in passages[r] or q.split()[-3] in passages[r]


def test_contrastive_loss_matches_numpy_infonce():
  rng = np.random.default_rng(0)
  hidden = {name: rng.normal(size=(4, 3, 5)).astype(np.float32) for name in ("query", "passage")}
  positions = np.array([[0, 1, 2], [0, 1, -1], [0, -1, -1], [0, 1, 2]])
  batch = {"query": "query", "passage": "passage", "query_pos": positions, "passage_pos": positions[::-1]}
  run_model = lambda which, positions_BT, return_hidden: jnp.asarray(hidden[which])
  loss_sum, weight = losses.contrastive_loss(run_model, batch, temperature=0.1)
  assert float(weight) == 4  # a sum over the 4 queries
  loss = float(loss_sum) / 4

  def pooled(h, pos):
    v = np.stack([h[i][pos[i] >= 0].mean(0) for i in range(4)])
    return v / np.linalg.norm(v, axis=1, keepdims=True)

  logits = pooled(hidden["query"], positions) @ pooled(hidden["passage"], positions[::-1]).T / 0.1
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  assert loss == pytest.approx(-np.mean(np.diag(logp)), rel=1e-5)


def test_chat_messages_use_the_chat_template(tmp_path):
  class TemplateTokenizer(tokenizers.ByteTokenizer):
    chat_template = "<turns>"

    def apply_chat_template(self, messages, add_generation_prompt=True):
      return "".join(f"[{m['role']}]{m['content']}" for m in messages) + (
        "[assistant]" if add_generation_prompt else ""
      )

  path = tmp_path / "chat.jsonl"
  path.write_text(
    json.dumps(
      {
        "messages": [
          {"role": "system", "content": "Be brief."},
          {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello"},
        ]
      }
    )
    + "\n",
    encoding="utf-8",
  )
  [example] = sft_lib.read_jsonl(str(path), TemplateTokenizer())
  assert example == sft_lib.Example("[system]Be brief.[user]Hi[assistant]", "Hello")
  with pytest.raises(ValueError, match="chat template"):
    sft_lib.read_jsonl(str(path), tokenizers.ByteTokenizer())


@pytest.mark.slow
def test_perplexity_matches_numpy():
  cfg, params = tiny_llama()
  tok = tokenizers.CharTokenizer("abcdefghijklmnopqr")
  text = "abcdefghijklmnopqrabcdefghijklmnopqr"[:25]
  result = evaluators.perplexity(cfg, params, tok, text, seq_len=8)
  ids = np.asarray(tok.encode(text))
  losses = []
  for start in (0, 8, 16):  # windows of 9 tokens: predict 8 each
    logits = np.asarray(
      model.Transformer(cfg).apply({"params": params}, jnp.asarray(ids[start : start + 8][None]))
    )[0]
    logp = (
      logits
      - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
      - logits.max(-1, keepdims=True)
    )
    losses += [-logp[t, ids[start + t + 1]] for t in range(8)]
  assert result["tokens"] == 24 and result["perplexity"] == pytest.approx(np.exp(np.mean(losses)), rel=1e-4)


@pytest.mark.slow
def test_packed_sft_rows_give_each_example_its_padded_loss_and_gradient():
  """data.packing for SFT: several examples per row (one with an empty prompt); per-example loss sums
  and the batch gradient equal those of one padded row per example."""
  tok = tokenizers.ByteTokenizer()
  examples = [
    sft_lib.Example("Q: 2+2?\nA:", " 4"),
    sft_lib.Example("", "no prompt"),
    sft_lib.Example("Say hi:", " hi there"),
    sft_lib.Example("Q: ok?", " yes"),
  ]
  padded = sft_lib.tokenize(examples, tok, seq_len=31)
  packed = sft_lib.pack(padded, tok.pad_id)
  assert len(packed.tokens) == 2 and packed.segment_ids[0].max() == 2  # 15 + 10 | 17 + 11 tokens
  cfg = model.ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=2, n_heads=2, max_len=32)
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  run_model = lambda p: lambda tokens, **kw: model.Transformer(cfg).apply({"params": p}, tokens, **kw)

  def per_example(batch, segments_BT):
    kw = (
      {"positions_BT": batch["positions"], "segment_ids_BT": batch["segment_ids"]}
      if "positions" in batch
      else {}
    )
    logits = run_model(params)(batch["inputs"], **kw)
    ce = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), batch["targets"][..., None], -1)[..., 0]
    return sorted(float((ce * batch["mask"])[segments_BT == s].sum()) for s in np.unique(segments_BT) if s)

  padded_batch = sft_lib.batch_at(padded, 0, 0, 4)
  packed_batch = sft_lib.batch_at(packed, 0, 0, 2)
  rows_as_segments = np.broadcast_to(np.arange(1, 5)[:, None], (4, 31))
  expected = per_example(padded_batch, rows_as_segments)
  segments = packed_batch["segment_ids"]
  got = per_example(packed_batch, np.where(segments > 0, segments + 10 * np.arange(2)[:, None], 0))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  grads = [
    jax.jit(jax.grad(lambda p, b=b: losses.lm_loss(run_model(p), b)[0]))(params)
    for b in (padded_batch, packed_batch)
  ]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), *grads)


def test_tokens_per_row_counts_tokens_not_padding():
  """Throughput and MFU of SFT count the tokens a row holds, not its padding: hand counts of each
  example's bytes + EOS, padded one per row and packed (a row's inputs are its first seq_len tokens)."""
  tok = tokenizers.ByteTokenizer()
  pairs = [("Q: 2+2?\nA:", " 4"), ("", "no prompt"), ("Say hi:", " hi there"), ("Q: ok?", " yes")]
  lengths = [len(p) + len(r) + 1 for p, r in pairs]  # bytes, then EOS: 13, 10, 17, 11
  padded = sft_lib.tokenize([sft_lib.Example(p, r) for p, r in pairs], tok, seq_len=31)
  assert sft_lib.tokens_per_row(padded) == pytest.approx(np.mean(lengths))
  packed = sft_lib.pack(padded, tok.pad_id)  # rows: 13 + 10 and 17 + 11 tokens
  assert sft_lib.tokens_per_row(packed) == pytest.approx((23 + 28) / 2)
  short = sft_lib.tokenize([sft_lib.Example("Say hi:", " hi there")], tok, seq_len=16)  # cut to 17
  assert sft_lib.tokens_per_row(short) == 16
