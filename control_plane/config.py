"""Parse and validate the routing YAML into a typed, immutable model.

Every error names the file, line, column and field, and all errors of a file are
reported together. Parsing works on PyYAML's node tree so that each value keeps its
position in the file.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")
HEADER_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)$")
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0}

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_PIN_HEADER = "x-model-version"
DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Version:
    name: str
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True)
class Shadow:
    version: str
    percent: float


@dataclass(frozen=True)
class Model:
    name: str
    versions: tuple[Version, ...]
    traffic: tuple[tuple[str, int], ...]
    shadow: Shadow | None = None
    pin_header: str = DEFAULT_PIN_HEADER
    timeout: float = DEFAULT_TIMEOUT

    def version(self, name: str) -> Version:
        return next(v for v in self.versions if v.name == name)


@dataclass(frozen=True)
class RoutingConfig:
    listen: Endpoint
    models: tuple[Model, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Problem:
    """One validation error at a position in the file."""

    path: str
    line: int
    column: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}:{self.column}"
        prefix = f"{where}: {self.field}" if self.field else where
        return f"{prefix}: {self.message}"


class ConfigError(Exception):
    """The file is not a valid routing config; `problems` lists every error found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class _Reader:
    """Walks a PyYAML node tree, converting values and collecting problems."""

    def __init__(self, path: str):
        self.path = path
        self.problems: list[Problem] = []
        self._constructor = yaml.SafeLoader("")

    def fail(self, node: yaml.Node, fieldname: str, message: str) -> None:
        mark = node.start_mark
        self.problems.append(Problem(self.path, mark.line + 1, mark.column + 1, fieldname, message))

    def scalar(self, node: yaml.Node, fieldname: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, fieldname, "expected a single value, not a list or mapping")
            return None
        return self._constructor.construct_object(node)

    def mapping(
        self, node: yaml.Node, fieldname: str, allowed: set[str] | None = None
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """Return {key: (key_node, value_node)}; report non-mappings, duplicates, unknown keys."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, fieldname, "expected a mapping")
            return {}
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node, fieldname)
            name = f"{fieldname}.{key}" if fieldname else str(key)
            if not isinstance(key, str):
                self.fail(key_node, fieldname, f"key {key!r} must be a string")
            elif key in out:
                self.fail(key_node, name, "duplicate key")
            elif allowed is not None and key not in allowed:
                expected = ", ".join(sorted(allowed))
                self.fail(key_node, name, f"unknown key {key!r} (expected one of: {expected})")
            else:
                out[key] = (key_node, value_node)
        return out

    def sequence(self, node: yaml.Node, fieldname: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, fieldname, "expected a list")
            return []
        return list(node.value)

    def name(self, node: yaml.Node, fieldname: str, what: str) -> str | None:
        value = self.scalar(node, fieldname)
        if not isinstance(value, str) or not NAME_RE.match(value):
            self.fail(
                node,
                fieldname,
                f"{what} name {value!r} must be lowercase letters, digits, '-' or '_' "
                "(at most 63, starting and ending with a letter or digit)",
            )
            return None
        return value

    def endpoint(self, node: yaml.Node, fieldname: str) -> Endpoint | None:
        value = self.scalar(node, fieldname)
        if not isinstance(value, str):
            self.fail(node, fieldname, f"expected 'host:port', got {value!r}")
            return None
        host, sep, port_text = value.rpartition(":")
        host = host.strip("[]")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            hint = " (use 127.0.0.1)" if host == "localhost" else ""
            self.fail(node, fieldname, f"{value!r} is not 'ip:port' with an IP address{hint}")
            return None
        if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            self.fail(node, fieldname, f"{value!r} needs a port between 1 and 65535")
            return None
        return Endpoint(host, int(port_text))

    def duration(self, node: yaml.Node, fieldname: str) -> float | None:
        value = self.scalar(node, fieldname)
        match = DURATION_RE.match(str(value)) if isinstance(value, str) else None
        if not match or float(match.group(1)) <= 0:
            self.fail(node, fieldname, f"{value!r} is not a positive duration like 500ms, 30s, 2m")
            return None
        return float(match.group(1)) * DURATION_UNITS[match.group(2)]


MODEL_KEYS = {"versions", "traffic", "shadow", "pin_header", "timeout"}


def _read_model(r: _Reader, name: str, name_node: yaml.Node, node: yaml.Node) -> Model | None:
    where = f"models.{name}"
    keys = r.mapping(node, where, MODEL_KEYS)
    before = len(r.problems)
    if "versions" not in keys:
        r.fail(name_node, where, "missing required key 'versions'")
        return None
    versions: list[Version] = []
    vnode = keys["versions"][1]
    for vname, (vkey, vvalue) in r.mapping(vnode, f"{where}.versions").items():
        vwhere = f"{where}.versions.{vname}"
        r.name(vkey, vwhere, "version")
        vkeys = r.mapping(vvalue, vwhere, {"endpoints"})
        if "endpoints" not in vkeys:
            r.fail(vkey, vwhere, "missing required key 'endpoints'")
            continue
        enodes = r.sequence(vkeys["endpoints"][1], f"{vwhere}.endpoints")
        if not enodes and isinstance(vkeys["endpoints"][1], yaml.SequenceNode):
            r.fail(vkeys["endpoints"][1], f"{vwhere}.endpoints", "needs at least one endpoint")
        endpoints = [r.endpoint(e, f"{vwhere}.endpoints[{i}]") for i, e in enumerate(enodes)]
        versions.append(Version(vname, tuple(e for e in endpoints if e)))
    if isinstance(vnode, yaml.MappingNode) and not vnode.value:
        r.fail(vnode, f"{where}.versions", "needs at least one version")
    known = {v.name for v in versions}

    traffic = _read_traffic(r, where, keys, versions, known, name_node)
    shadow = None
    if "shadow" in keys:
        shadow = _read_shadow(r, f"{where}.shadow", keys["shadow"][1], known)
    pin_header = DEFAULT_PIN_HEADER
    if "pin_header" in keys:
        value = r.scalar(keys["pin_header"][1], f"{where}.pin_header")
        if not isinstance(value, str) or not HEADER_RE.match(value):
            r.fail(keys["pin_header"][1], f"{where}.pin_header", f"{value!r} is not a header name")
        else:
            pin_header = value
    timeout = DEFAULT_TIMEOUT
    if "timeout" in keys:
        timeout = r.duration(keys["timeout"][1], f"{where}.timeout") or DEFAULT_TIMEOUT
    if len(r.problems) > before:
        return None
    return Model(name, tuple(versions), traffic, shadow, pin_header, timeout)


def _read_traffic(
    r: _Reader,
    where: str,
    keys: dict[str, tuple[yaml.Node, yaml.Node]],
    versions: list[Version],
    known: set[str],
    name_node: yaml.Node,
) -> tuple[tuple[str, int], ...]:
    if "traffic" not in keys:
        if len(versions) == 1:
            return ((versions[0].name, 100),)
        if versions:
            r.fail(name_node, where, "has several versions, so 'traffic' must give their weights")
        return ()
    tnode = keys["traffic"][1]
    weights: list[tuple[str, int]] = []
    for vname, (vkey, wnode) in r.mapping(tnode, f"{where}.traffic").items():
        fieldname = f"{where}.traffic.{vname}"
        if vname not in known:
            listed = ", ".join(sorted(known))
            r.fail(vkey, fieldname, f"unknown version {vname!r} (versions: {listed})")
        weight = r.scalar(wnode, fieldname)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            r.fail(wnode, fieldname, f"weight must be a non-negative integer, got {weight!r}")
        else:
            weights.append((vname, weight))
    if isinstance(tnode, yaml.MappingNode) and weights and not any(w for _, w in weights):
        r.fail(tnode, f"{where}.traffic", "all weights are zero: at least one must be positive")
    if isinstance(tnode, yaml.MappingNode) and not tnode.value:
        r.fail(tnode, f"{where}.traffic", "needs at least one version with a positive weight")
    return tuple(weights)


def _read_shadow(r: _Reader, where: str, node: yaml.Node, known: set[str]) -> Shadow | None:
    keys = r.mapping(node, where, {"version", "percent"})
    for required in ("version", "percent"):
        if required not in keys and isinstance(node, yaml.MappingNode):
            r.fail(node, where, f"missing required key {required!r}")
    if "version" not in keys or "percent" not in keys:
        return None
    version = r.scalar(keys["version"][1], f"{where}.version")
    if version not in known:
        r.fail(keys["version"][1], f"{where}.version", f"unknown version {version!r}")
    percent = r.scalar(keys["percent"][1], f"{where}.percent")
    if isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 <= percent <= 100:
        r.fail(keys["percent"][1], f"{where}.percent", f"must be a number 0-100, got {percent!r}")
        return None
    return Shadow(str(version), float(percent))


def parse(text: str, path: str = "<string>") -> RoutingConfig:
    """Parse routing YAML text; raise ConfigError listing every problem with its position."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([Problem(path, line, col, "", f"invalid YAML: {problem}")]) from None
    if root is None:
        raise ConfigError([Problem(path, 1, 1, "", "the file is empty")])
    r = _Reader(path)
    top = r.mapping(root, "", {"listen", "models"})
    listen = Endpoint("127.0.0.1", 8080)
    if "listen" in top:
        listen = r.endpoint(top["listen"][1], "listen") or listen
    models: list[Model] = []
    if "models" not in top:
        if isinstance(root, yaml.MappingNode):
            r.fail(root, "", "missing required key 'models'")
    else:
        for mname, (mkey, mnode) in r.mapping(top["models"][1], "models").items():
            if r.name(mkey, f"models.{mname}", "model"):
                model = _read_model(r, mname, mkey, mnode)
                if model:
                    models.append(model)
    if r.problems:
        raise ConfigError(r.problems)
    return RoutingConfig(listen, tuple(models))


def load(path: str | Path) -> RoutingConfig:
    """Read and parse a routing YAML file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        problem = Problem(str(p), 1, 1, "", f"cannot read file: {exc.strerror}")
        raise ConfigError([problem]) from None
    return parse(text, str(p))
