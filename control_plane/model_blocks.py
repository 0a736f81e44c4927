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

# Each pattern starts at the newline before a line: the text is searched with one newline
# put in front, so that a match's start is the offset in the text where its line begins.
# (A literal first character lets the regex engine skip ahead; `^` with MULTILINE is 4-10x
# slower on a 300 kB file.)
_MODELS = re.compile(r"\nmodels:[ \t]*(?:#[^\n]*)?(?![^\n])")
_MODEL = re.compile(r"\n  ([^\s#'\"{}\[\],&*!|>%@`:][^\s:]*):(?:[ \t][^\n]*)?(?![^\n])")
_SECTION_END = re.compile(r"\n[^ #\n]")  # a line at column 0
_SHALLOW = re.compile(r"\n {0,2}[^ \n#]")  # content less indented than a model's body
_CONTENT = re.compile(r"\n *[^ \n#]")
_DOCUMENT_MARK = re.compile(r"\n(?:---|\.\.\.|%)")


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
    None when the file is not in the plain layout. A few regular-expression scans of the
    whole text, no loop over its lines (15 ms at 1,000 models with one, 2-3 ms now)."""
    lined = "\n" + text  # see the patterns
    if "&" in text or "*" in text or "\t" in text or _DOCUMENT_MARK.search(lined):
        return None  # anchors, aliases, tabs, several documents, directives
    found = list(_MODELS.finditer(lined))
    if len(found) != 1:
        return None
    models = found[0]
    section_end = _SECTION_END.search(lined, models.end())
    end = section_end.start() if section_end else len(text)
    starts = list(_MODEL.finditer(lined, models.end(), end + 1))
    if (
        not starts
        or _CONTENT.search(lined, models.end(), starts[0].start())  # indented, before them
        or len(_SHALLOW.findall(lined, models.end(), end + 1)) != len(starts)  # a bad indent
        or len({m.group(1) for m in starts}) != len(starts)
    ):
        return None  # let the full parse judge it
    blocks = []
    line = text.count("\n", 0, starts[0].start())
    for k, match in enumerate(starts):
        stop = starts[k + 1].start() if k + 1 < len(starts) else end
        body = text[match.start() : stop]
        blocks.append(Block(match.group(1), line, body if body.endswith("\n") else body + "\n"))
        line += body.count("\n")
    blank = "\n" * text.count("\n", models.end() - 1, end)
    return text[: models.start()] + "models: {}" + blank + text[end:], blocks
