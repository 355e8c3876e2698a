"""One line of documentation per config field, read from the comments beside the defaults.

The docs live where the defaults are set (run/config.py's `base_config`, model/config.py's
`ModelConfig`): a trailing comment on a field's line, else the comment lines just above it. This
module reads them back with `tokenize`, so `--help` (cli/) prints the same words a reader of the code
sees, and a test keeps every field documented.
"""

from __future__ import annotations

import inspect
import io
import re
import tokenize

from lmjax import model
from lmjax.run import config as config_lib

_DICT_FIELD = re.compile(r"^\s+(\w+)=")  # `name=value,` inside `cfg.section = dict(`
_SECTION = re.compile(r"^\s+cfg\.(\w+) = (?:dict\(|\{|ml_collections)")
_ATTRIBUTE = re.compile(r"^\s+cfg\.(\w+)(?:\.(\w+))? = ")  # cfg.seed = 0, cfg.model.head_dim = ...
_DATACLASS_FIELD = re.compile(r"^\s+(\w+): [^=]+=")


def _comments(source: str) -> tuple[dict, set]:
  """({line number: comment text}, line numbers holding only a comment) of `source`."""
  comments, code_lines = {}, set()
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      comments[token.start[0]] = token.string.lstrip("#").strip()
    elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
      code_lines.add(token.start[0])
  alone = {n for n in comments if n not in code_lines}
  return comments, alone


def _docs(source: str, name_of) -> dict:
  """{field: doc} for the lines of `source` that `name_of(line)` names a field on."""
  comments, alone = _comments(source)
  docs, pending = {}, []
  for number, line in enumerate(source.splitlines(), start=1):
    if number in alone:
      pending.append(comments[number])
      continue
    name = name_of(line)
    if name:
      docs[name] = comments.get(number) or " ".join(pending)
    pending = []
  return docs


def field_docs() -> dict:
  """{'section.field': doc} for every field of the base config ('' where none is written)."""
  section = None

  def config_name(line):
    nonlocal section
    if match := _SECTION.match(line):
      section = match.group(1)
      return None
    if match := _ATTRIBUTE.match(line):
      return ".".join(g for g in match.groups() if g)
    if section and (match := _DICT_FIELD.match(line)):
      return f"{section}.{match.group(1)}"
    return None

  docs = _docs(inspect.getsource(config_lib.base_config), config_name)
  model_docs = _docs(
    inspect.getsource(model.ModelConfig), lambda line: (m := _DATACLASS_FIELD.match(line)) and m.group(1)
  )
  for name, doc in model_docs.items():  # base_config's own comment wins where it has one
    docs[f"model.{name}"] = docs.get(f"model.{name}") or doc
  return {key: docs.get(key, "") for key in config_lib.flat_keys(config_lib.base_config())}


def help_text(cfg) -> str:
  """The fields of `cfg` with their values and docs, one per line, for `--help`."""
  docs = field_docs()
  lines = []
  for key in config_lib.flat_keys(cfg):
    value = cfg
    for part in key.split("."):
      value = value[part]
    lines.append(f"  --config.{key}={value!r}" + (f"\n      {docs[key]}" if docs.get(key) else ""))
  return "\n".join(lines)
