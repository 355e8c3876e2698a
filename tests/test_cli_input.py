"""Bad input to lmjax-sample and lmjax-evaluate: a flag out of range is absl's usage error, and what the
user can fix after the flags parse (a missing file, a prompt the model's context cannot hold, a text
too short to score) is one `error: ...` line with status 2, never a traceback."""

import json

import pytest
from test_gguf_export import byte_level_bpe, tiny_llama

from lmjax.pretrained import gguf_export

from conftest import run_lmjax


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("model") / "tiny.gguf")
  cfg, params = tiny_llama(True, max_len=32)
  gguf_export.export(cfg, params, byte_level_bpe(), path)
  return f"--pretrained={path}"


def _refused(result, status, message):
  assert result.returncode == status, result.stderr[-2000:]
  assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("flag", ["--max_new_tokens=0", "--num_samples=0", "--temperature=-1"])
def test_sample_flags_out_of_range_are_usage_errors(model, flag):
  _refused(run_lmjax("sample", model, flag), 1, f"Flags parsing error: flag {flag}: ")


def test_sample_input_errors_name_what_to_fix(model, tmp_path):
  _refused(run_lmjax("sample", model, f"--prompt_file={tmp_path}/nope.txt"), 2, "nope.txt: no such file")
  _refused(
    run_lmjax("sample", model, "--top_p=0", "--temperature=1"),
    2,
    "--top_p=0.0: give a probability mass in (0, 1]",
  )
  too_long = run_lmjax("sample", model, "--prompt=" + "word " * 40, "--max_new_tokens=2")
  _refused(too_long, 2, "error: cannot sample: ")
  _refused(run_lmjax("sample", model, "--prompt="), 2, "error: cannot sample: ")


def test_evaluate_input_errors_name_what_to_fix(model, tmp_path):
  _refused(run_lmjax("evaluate", model, f"--text_file={tmp_path}/nope.txt"), 2, "nope.txt: no such file")
  (tmp_path / "short.txt").write_text("a")
  (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
  _refused(run_lmjax("evaluate", model, f"--text_file={tmp_path}/latin1.txt"), 2, "latin1.txt: 'utf-8' codec")
  short = f"--text_file={tmp_path}/short.txt"
  _refused(run_lmjax("evaluate", model, short), 2, "short.txt: the text has 1 tokens; perplexity needs")
  _refused(run_lmjax("evaluate", model, short, "--seq_len=1"), 1, "Flags parsing error: flag --seq_len=1: ")


def test_lm_eval_results_record_the_dtype_evaluated(model, tmp_path):
  """An int8 result must not read as the fp32 one: lm-eval's results keep model_args."""
  path = model.removeprefix("--pretrained=")
  out = str(tmp_path / "results")
  args = [f"--model=pretrained:{path}", "--tasks=lmjax_qa_mc", "--limit=2", "--dtype=int8", f"--output={out}"]
  result = run_lmjax("evaluate", *args)
  assert result.returncode == 0, result.stderr[-2000:]
  with open(out + ".json") as f:
    assert json.load(f)["config"]["model_args"] == f"model=pretrained:{path},dtype=int8"
