"""Routing files for the benchmark: N models with 3 versions each, and weight edits."""

from __future__ import annotations

import os
from pathlib import Path

VERSIONS = ("v1", "v2", "v3")


def weights(edit: int) -> tuple[int, int, int]:
    """Weights of v1..v3 of the first model after `edit` edits (0: the initial file); 80
    edits in a row differ (the bench waits for a route version it has not seen)."""
    step = edit % 80
    return 80 - step, 15 + step, 5


def routing_yaml(models: int, edit: int = 0) -> str:
    """A routing file of `models` models; edit `edit` changes the first model's weights."""
    lines = ["listen: 127.0.0.1:8080", "models:"]
    for m in range(models):
        lines.append(f"  model-{m:04d}:")
        lines.append("    versions:")
        for i, v in enumerate(VERSIONS):
            port = 20000 + (m * len(VERSIONS) + i) % 40000
            lines.append(f"      {v}: {{endpoints: [127.0.0.1:{port}, 127.0.0.2:{port}]}}")
        w = weights(edit) if m == 0 else weights(0)
        lines.append(f"    traffic: {{v1: {w[0]}, v2: {w[1]}, v3: {w[2]}}}")
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Write a temporary file and rename it over `path`, as editors and deploy tools do."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
