"""GGUF export against llama.cpp: SmolLM2-135M-Instruct exported by `lmjax-export` at each dtype, then
32 greedy tokens of a chat prompt from llama.cpp (llama-cpp-python, in another interpreter) and from
lmjax on the same file. Equal tokens mean llama.cpp reads the file as the model lmjax computes.

  python benchmarks/gguf_export_llama_cpp.py --llama_python=/tmp/llvenv/bin/python
  (python -m venv /tmp/llvenv && /tmp/llvenv/bin/pip install llama-cpp-python)
"""

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

from lmjax.inference.language_model import LanguageModel

_LLAMA = flags.DEFINE_string("llama_python", None, "A Python with llama_cpp installed.", required=True)
_DTYPES = flags.DEFINE_list("dtypes", ["f32", "f16", "q8_0"], "Export dtypes.")
_TOKENS = flags.DEFINE_integer("tokens", 32, "Greedy tokens compared.")
_QUESTION = "What is the capital of France? Tell me about it."
_LLAMA_GREEDY = """
import json, sys, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_threads=2, n_ctx=512, verbose=False)
llm.eval(json.loads(sys.argv[2]))
out = []
for _ in range(int(sys.argv[3])):
  token = llm.sample(temp=0.0)
  out.append(int(token))
  llm.eval([token])
print(json.dumps(out))
"""


def llama_cpp_greedy(path: str, ids: list) -> list:
  command = [_LLAMA.value, "-c", _LLAMA_GREEDY, path, json.dumps(ids), str(_TOKENS.value)]
  return json.loads(
    subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
  )


def main(_):
  with tempfile.TemporaryDirectory() as tmp:
    for dtype in _DTYPES.value:
      path = os.path.join(tmp, f"smollm2.{dtype}.gguf")
      subprocess.run(
        [
          sys.executable,
          "-m",
          "lmjax.cli.export",
          "--model=pretrained:smollm2-135m-instruct",
          f"--dtype={dtype}",
          f"--output={path}",
        ],
        check=True,
      )
      lm = LanguageModel.from_pretrained(path)
      ids = lm.tokenizer.encode(lm.chat_prompt(_QUESTION))
      ours = lm.generate(ids, max_new_tokens=_TOKENS.value, do_sample=False, eos_token_id=-1)[0][len(ids) :]
      theirs = llama_cpp_greedy(path, ids)
      same = sum(a == b for a, b in zip(ours.tolist(), theirs))
      print(
        f"{dtype}: {same}/{_TOKENS.value} greedy tokens equal; llama.cpp: {lm.tokenizer.decode(theirs)!r}"
      )


if __name__ == "__main__":
  app.run(main)
