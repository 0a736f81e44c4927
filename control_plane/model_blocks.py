"""Split a routing file's text into its top level and one text block per model, so that a
save re-reads only the models it changed (composing 1,000 models with libyaml alone took
longer than the whole budget of a save).

Only the plain layout is split: a `models:` line at column 0 and each model a block
starting with two spaces, its name and a colon. Anything else (flow style, anchors and
aliases, several documents, tabs, a name given twice) returns None, and the caller parses
the whole file as one document, as it does for any file with an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_MODELS = re.compile(r"models:[ \t]*(#.*)?")
_MODEL = re.compile(r"  ([^\s#'\"{}\[\],&*!|>%@`:][^\s:]*):(?:[ \t].*)?")
_UNSPLITTABLE = re.compile(r"[&*\t]|^---|^\.\.\.|^%", re.MULTILINE)


@dataclass(frozen=True)
class Block:
    name: str
    line: int  # 0-based line of `  name:` in the file
    text: str  # its lines, as in the file

    def document(self) -> str:
        """A YAML document holding only this model, on the lines it has in the file (so
        positions in it are the file's)."""
        return "\n" * (self.line - 1) + "models:\n" + self.text


def split(text: str) -> tuple[str, list[Block]] | None:
    """(the file with `models: {}` in place of its models section, the model blocks), or
    None when the file is not in the plain layout."""
    if _UNSPLITTABLE.search(text):
        return None
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if _MODELS.fullmatch(line)]
    if len(starts) != 1:
        return None
    first = starts[0] + 1
    end = next(
        (i for i in range(first, len(lines)) if lines[i][:1] not in ("", " ", "#")), len(lines)
    )
    blocks: list[Block] = []
    for i in range(first, end):
        line = lines[i]
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if match := _MODEL.fullmatch(line):
            blocks.append(Block(match.group(1), i, ""))
        elif not line.startswith("   ") or not blocks:
            return None  # an unexpected indent: let the full parse judge it
    if not blocks or len({b.name for b in blocks}) != len(blocks):
        return None
    bounds = [b.line for b in blocks] + [end]
    blocks = [
        Block(b.name, b.line, "\n".join(lines[b.line : bounds[k + 1]]) + "\n")
        for k, b in enumerate(blocks)
    ]
    head = lines[: starts[0]] + ["models: {}"] + [""] * (end - first) + lines[end:]
    return "\n".join(head), blocks
