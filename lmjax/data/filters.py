"""The document filter stage of preparation: functions that map a document's text or drop it.

`data.filters` names them, comma-separated, each `name` or `name:argument`; a name is a built-in
(`FILTERS`) or an importable `package.module.function` taking (text, argument) and returning the
new text or None to drop the document, so deduplication and PII scrubbing plug in without touching
lmjax. The store's manifest records, per source and filter, the documents seen, dropped and changed.

Filters see whole documents. A document longer than sources.PIECE_BYTES (a big text file) streams
in pieces and passes unfiltered; the counts report how many did (`unfiltered_long`).
"""

from __future__ import annotations

import importlib

from lmjax.core import errors


def min_chars(text: str, argument: str) -> str | None:
  """Drops documents shorter than `argument` characters (whitespace at either end not counted)."""
  return text if len(text.strip()) >= int(argument) else None


FILTERS = {"min_chars": min_chars}


def parse(spec: str) -> list:
  """[(label, function, argument)] for a `data.filters` string; raises ConfigError for an unknown
  name or a built-in's missing argument."""
  chain = []
  for part in (p.strip() for p in spec.split(",") if p.strip()):
    name, _, argument = part.partition(":")
    if name in FILTERS:
      function = FILTERS[name]
      if not argument.isdigit() or not int(argument):
        raise errors.ConfigError(f"data.filters: {name} needs a whole number > 0, e.g. '{name}:200'")
    else:
      module, _, attr = name.rpartition(".")
      try:
        function = getattr(importlib.import_module(module), attr) if module else None
        why = "" if function is None else None
      except (ImportError, AttributeError) as err:
        function, why = None, f" ({type(err).__name__}: {err})"
      if function is None:
        raise errors.ConfigError(
          f"data.filters: {name!r} is neither a built-in filter ({sorted(FILTERS)}) nor an importable "
          f"package.module.function{why or ''}; a module of your own must be on PYTHONPATH"
        )
    chain.append((part, function, argument))
  return chain


class Counts:
  """Per filter: documents seen, dropped, changed; plus documents too long to filter."""

  def __init__(self, chain):
    self.by_filter = {label: {"seen": 0, "dropped": 0, "changed": 0} for label, _, _ in chain}
    self.unfiltered_long = 0

  def as_dict(self) -> dict:
    return {**self.by_filter, "unfiltered_long": self.unfiltered_long} if self.by_filter else {}


def apply(chain, pieces, counts: Counts):
  """The (starts_document, text) pieces with the filters applied to each whole document."""
  if not chain:
    yield from pieces
    return
  held = None  # one piece of lookahead: a piece is a whole document iff the next one starts another
  for piece in pieces:
    if held is not None:
      yield from _filtered(chain, held, whole=piece[0], counts=counts)
    held = piece
  if held is not None:
    yield from _filtered(chain, held, whole=True, counts=counts)


def _filtered(chain, piece, whole: bool, counts: Counts):
  starts, text = piece
  if not (starts and whole):
    counts.unfiltered_long += starts
    yield piece
    return
  for label, function, argument in chain:
    counts.by_filter[label]["seen"] += 1
    new = function(text, argument)
    if new is None:
      counts.by_filter[label]["dropped"] += 1
      return
    counts.by_filter[label]["changed"] += new != text
    text = new
  yield True, text
