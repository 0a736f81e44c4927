"""Round-trip edits of the routing YAML: load -> edit paths -> validate -> write.

ruamel.yaml keeps the operator's comments, key order, quoting and flow style. `save`
validates the result with `config.parse` first and writes atomically, and only if the file
on disk still has the bytes it was read from: an edit made meanwhile is never clobbered.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from control_plane import config
from control_plane.state_store import write_atomically

if TYPE_CHECKING:  # ruamel.yaml is imported at the first edit: a control plane starts without
    from ruamel.yaml import YAML

Keys = Sequence[str]


class StaleFile(Exception):
    """The file changed on disk after it was read."""


def _yaml() -> YAML:
    from ruamel.yaml import YAML

    y = YAML()
    y.preserve_quotes = True
    y.width = 4096  # never re-wrap long lines
    return y


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _walk(node: Any, keys: Keys) -> Any:
    for key in keys:
        node = node[key]
    return node


class Document:
    """A routing YAML file read for editing."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        raw = self.path.read_bytes()
        self.digest = _digest(raw)
        self.data = _yaml().load(raw.decode())

    def get(self, keys: Keys) -> Any:
        return _walk(self.data, keys)

    def set(self, keys: Keys, value: Any) -> None:
        """Set the value at `keys`. A mapping replacing a mapping is updated in place, so its
        style and comments stay; a new mapping of plain values is written in flow style."""
        from ruamel.yaml.comments import CommentedMap

        parent, last = self.get(keys[:-1]), keys[-1]
        old = parent.get(last)
        if isinstance(old, CommentedMap) and isinstance(value, dict):
            for key in [k for k in old if k not in value]:
                del old[key]
            old.update(value)
            return
        if isinstance(value, dict) and not any(isinstance(v, dict | list) for v in value.values()):
            flow = CommentedMap(value)
            flow.fa.set_flow_style()
            value = flow
        parent[last] = value

    def delete(self, keys: Keys) -> None:
        """Remove the key at `keys` with its value's lines. In a block mapping this works on
        the text, so that comments after the value (which ruamel attaches to the value's
        last item) stay in the file."""
        parent, last = self.get(keys[:-1]), keys[-1]
        if last not in parent:
            return
        if parent.fa.flow_style():
            del parent[last]
            return
        text = self.text()  # positions from the text as it is now, after earlier edits
        start, column = _walk(_yaml().load(text), keys[:-1]).lc.key(last)
        lines = text.splitlines(keepends=True)
        end = start + 1  # one past the last line of the value
        for i in range(start + 1, len(lines)):
            stripped = lines[i].strip()
            indent = len(lines[i]) - len(lines[i].lstrip())
            if stripped and indent <= column:
                break
            if stripped and not stripped.startswith("#"):
                end = i + 1
        self.data = _yaml().load("".join(lines[:start] + lines[end:]))

    def text(self) -> str:
        out = io.StringIO()
        _yaml().dump(self.data, out)
        return out.getvalue()


def save(doc: Document) -> None:
    """Validate `doc` and write it over its file, unless the file changed since it was read.
    Raises `config.ConfigError` (the file is untouched) or `StaleFile`."""
    text = doc.text()
    config.parse(text, str(doc.path))

    def unchanged() -> None:
        if _digest(doc.path.read_bytes()) != doc.digest:
            raise StaleFile(f"{doc.path} changed since it was read; not overwriting it")

    unchanged()
    write_atomically(doc.path, text.encode(), before_replace=unchanged)


def write_traffic(path: str | Path, model: str, traffic: dict[str, int]) -> None:
    """Give `model` this traffic and drop its `rollout` block (a rollout's end)."""
    doc = Document(path)
    doc.set(["models", model, "traffic"], traffic)
    doc.delete(["models", model, "rollout"])
    save(doc)
