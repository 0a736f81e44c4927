"""Parse and validate the routing YAML into a typed, immutable model.

Every error names the file, line, column and field, and all errors of a file are
reported together. Parsing works on PyYAML's node tree so that each value keeps its
position in the file.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

import yaml

from control_plane import model_blocks
from control_plane.resilience import Resilience, read_resilience
from control_plane.upstream_tls import TlsFileError, UpstreamTls, check
from control_plane.yaml_reader import NAME_RE, Problem, Reader

__all__ = [
    "NAME_RE",
    "Access",
    "ConfigError",
    "Consumers",
    "Endpoint",
    "Jwt",
    "Limits",
    "Model",
    "Problem",
    "Rate",
    "Rollout",
    "RoutingConfig",
    "load",
    "parse",
    "parse_endpoint",
]

# libyaml's parser when PyYAML was built with it (its wheels are): about 5x faster.
FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
HEADER_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
DEFAULT_PIN_HEADER = "x-model-version"
DEFAULT_TIMEOUT = 30.0


DEFAULT_STABILIZATION = 30.0
DEFAULT_IDLE = 60.0
DEFAULT_WINDOW = 60.0  # Knative's stable window


@dataclass(frozen=True)
class Autoscale:
    """Scale a version on its average concurrency (docs/scaling.md)."""

    min: int = 0
    max: int = 1
    target_concurrency: float = 1.0
    stabilization: float = DEFAULT_STABILIZATION  # scale-down waits this long
    window: float = DEFAULT_WINDOW  # the stable window; the panic window is a tenth of it
    idle: float = DEFAULT_IDLE  # no request for this long: scale to `min` (zero if min is 0)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(value: object) -> Endpoint:
    """`ip:port` (IPv6 in brackets) to an Endpoint; ValueError says what is wrong."""
    if not isinstance(value, str):
        raise ValueError(f"expected 'ip:port', got {value!r}")
    return _parse_address(value)


@functools.lru_cache(maxsize=65536)
def _parse_address(value: str) -> Endpoint:
    """Cached: a save re-parses the whole file, and checking an IP address was a third
    of parsing 1,000 models (an error is not cached: it is raised again)."""
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        hint = " (use 127.0.0.1)" if host == "localhost" else ""
        raise ValueError(f"{value!r} is not 'ip:port' with an IP address{hint}") from None
    if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r} needs a port between 1 and 65535")
    return Endpoint(host, int(port_text))


class ConfigError(Exception):
    """The file is not a valid routing config; `problems` lists every error found."""

    def __init__(self, problems: list[Problem], files: tuple[Path, ...] = ()):
        self.problems = problems
        self.files = files  # the keys and JWKS files the routing file names (to watch them)
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class Version:
    name: str
    endpoints: tuple[Endpoint, ...]
    grpc_endpoints: tuple[Endpoint, ...] = ()  # the same servers' gRPC ports
    replicas: int | None = None  # model servers that `infergate run` starts and keeps
    autoscale: Autoscale | None = None  # replicas that `infergate run` scales with load


@dataclass(frozen=True)
class Shadow:
    version: str
    percent: float


@dataclass(frozen=True)
class RolloutShadow:
    """The optional phase before step one: the canary gets mirrored traffic only."""

    percent: float = 100.0
    min_pairs: int = 300
    min_agreement: float = 0.99
    rtol: float = 1e-5
    atol: float = 1e-6


@dataclass(frozen=True)
class Rollout:
    """A canary rollout: weights step by step, each step judged against the baseline."""

    canary: str
    baseline: str  # the non-canary version that has the traffic in the file
    steps: tuple[int, ...] = (10, 25, 50, 100)
    interval: float = 10.0
    min_requests: int = 100
    max_error_rate: float = 0.01
    max_p99: float | None = None
    max_p99_ratio: float = 1.5
    failure_limit: int = 1
    hold_timeout: float | None = None  # None: 10 intervals
    shadow: RolloutShadow | None = None

    @property
    def hold_limit(self) -> float:
        return self.hold_timeout if self.hold_timeout is not None else 10 * self.interval


@dataclass(frozen=True)
class Access:
    """Who may call a model: everyone (`public`), or the named consumers only."""

    public: bool = False
    consumers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Jwt:
    """JWTs from one issuer, verified against a local JWKS; the consumer is a claim."""

    issuer: str
    audiences: tuple[str, ...]
    jwks_file: Path
    jwks: str = field(repr=False)  # the JWKS document (JSON text) read from jwks_file
    consumer_claim: str = "sub"


@dataclass(frozen=True)
class Consumers:
    """Who may call the gateway: API keys (from `keys_file`) and/or JWTs, and each
    consumer's priority. Keys are secrets: never in a repr, log or message."""

    keys: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # (consumer, key)
    keys_file: Path | None = None
    jwt: Jwt | None = None
    priority: dict[str, str] = field(default_factory=dict, hash=False)  # name -> level

    @property
    def files(self) -> tuple[Path, ...]:
        """The files this block was read from (the watcher watches them too)."""
        return tuple(f for f in (self.keys_file, self.jwt and self.jwt.jwks_file) if f)

    @property
    def known(self) -> frozenset[str] | None:
        """The consumer names access rules may use; None when any name may authenticate
        (a JWT's claim names consumers that no file lists)."""
        if self.keys_file is None or self.jwt is not None:
            return None
        return frozenset(name for name, _ in self.keys)


@dataclass(frozen=True)
class Model:
    name: str
    versions: tuple[Version, ...]
    traffic: tuple[tuple[str, int], ...]
    shadow: Shadow | None = None
    pin_header: str = DEFAULT_PIN_HEADER
    timeout: float = DEFAULT_TIMEOUT
    resilience: Resilience = field(default_factory=Resilience)
    # Where Envoy serves this model's KServe V2 gRPC API (the model name travels in the
    # request body, which Envoy does not route on: one listener per model instead).
    grpc_listen: Endpoint | None = None
    rollout: Rollout | None = None
    access: Access | None = None  # None: any valid consumer (once `consumers` is configured)
    limits: Limits | None = None  # what each consumer may spend (docs/api-management.md)

    def version(self, name: str) -> Version:
        return next(v for v in self.versions if v.name == name)

    def __hash__(self) -> int:
        """Computed once per model: the translator's caches look every model up by value on
        each build (hashing all its fields anew took 28 ms per edit at 1,000 models)."""
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, f.name) for f in fields(self)))
            object.__setattr__(self, "_hash", cached)
        return cached


@dataclass(frozen=True)
class RoutingConfig:
    listen: Endpoint
    models: tuple[Model, ...] = field(default_factory=tuple)
    consumers: Consumers | None = None  # None: the gateway is open to all
    upstream_tls: UpstreamTls | None = None  # mutual TLS from Envoy to the model servers
    # When the quota service (the control plane) is unreachable: "open" admits, "closed" rejects.
    quota_on_failure: str = "open"


def _read_endpoint(r: Reader, node: yaml.Node, fieldname: str) -> Endpoint | None:
    try:
        return parse_endpoint(r.scalar(node, fieldname))
    except ValueError as exc:
        r.fail(node, fieldname, str(exc))
        return None


VERSION_KEYS = {"endpoints", "grpc_endpoints", "replicas", "autoscale"}
AUTOSCALE_KEYS = {"min", "max", "target_concurrency", "stabilization", "idle", "window"}
MODEL_KEYS = {
    "versions",
    "traffic",
    "shadow",
    "pin_header",
    "timeout",
    "resilience",
    "grpc_listen",
    "rollout",
    "access",
    "limits",
}


def _read_model(
    r: Reader,
    name: str,
    name_node: yaml.Node,
    node: yaml.Node,
    defaults: Resilience,
    consumers: Consumers | None = None,
) -> Model | None:
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
        vkeys = r.mapping(vvalue, vwhere, VERSION_KEYS)
        replicas, autoscale = _read_scaling(r, vwhere, vkeys)
        if not {"endpoints", "replicas", "autoscale"} & vkeys.keys():
            r.fail(
                vkey,
                vwhere,
                "needs 'endpoints' (servers started elsewhere), or 'replicas' or 'autoscale' "
                "(servers that infergate run starts)",
            )
            continue
        lists = {}
        for key in ("endpoints", "grpc_endpoints"):
            nodes = r.sequence(vkeys[key][1], f"{vwhere}.{key}") if key in vkeys else []
            parsed = [_read_endpoint(r, e, f"{vwhere}.{key}[{i}]") for i, e in enumerate(nodes)]
            lists[key] = tuple(e for e in parsed if e)
        if "grpc_listen" in keys and "grpc_endpoints" not in vkeys:
            r.fail(vkey, vwhere, "the model has grpc_listen, so each version needs grpc_endpoints")
        versions.append(
            Version(vname, lists["endpoints"], lists["grpc_endpoints"], replicas, autoscale)
        )
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
    resilience = defaults
    if "resilience" in keys:
        resilience = read_resilience(r, keys["resilience"][1], f"{where}.resilience", defaults)
    grpc_listen = None
    if "grpc_listen" in keys:
        grpc_listen = _read_endpoint(r, keys["grpc_listen"][1], f"{where}.grpc_listen")
    rollout = None
    if "rollout" in keys:
        rollout = _read_rollout(r, f"{where}.rollout", keys["rollout"][1], known, traffic)
    access = None
    if "access" in keys:
        access = _read_access(r, f"{where}.access", keys["access"][1], consumers)
    limits = None
    if "limits" in keys:
        limits = read_limits(r, keys["limits"][1], f"{where}.limits")
    if len(r.problems) > before:
        return None
    return Model(
        name,
        tuple(versions),
        traffic,
        shadow,
        pin_header,
        timeout,
        resilience,
        grpc_listen,
        rollout=rollout,
        access=access,
        limits=limits,
    )


def _count(r: Reader, node: yaml.Node, where: str) -> int | None:
    value = r.scalar(node, where)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        r.fail(node, where, f"must be a non-negative integer, got {value!r}")
        return None
    return value


def _read_autoscale(r: Reader, node: yaml.Node, where: str) -> Autoscale | None:
    keys = r.mapping(node, where, AUTOSCALE_KEYS)
    before = len(r.problems)
    values: dict = {}
    for key in ("min", "max"):
        if key in keys:
            values[key] = _count(r, keys[key][1], f"{where}.{key}")
    if "target_concurrency" in keys:
        tnode = keys["target_concurrency"][1]
        target = r.scalar(tnode, f"{where}.target_concurrency")
        if isinstance(target, bool) or not isinstance(target, int | float) or target <= 0:
            r.fail(tnode, f"{where}.target_concurrency", f"must be a number > 0, got {target!r}")
        else:
            values["target_concurrency"] = float(target)
    for key in ("stabilization", "idle", "window"):
        if key in keys:
            values[key] = r.duration(keys[key][1], f"{where}.{key}")
    if len(r.problems) > before:
        return None
    autoscale = Autoscale(**values)
    if autoscale.min > autoscale.max:
        at = keys["min"][1] if "min" in keys else node
        r.fail(at, f"{where}.min", f"{autoscale.min} is greater than max {autoscale.max}")
        return None
    if autoscale.max == 0:
        r.fail(keys["max"][1], f"{where}.max", "must be at least 1")
        return None
    return autoscale


def _read_scaling(
    r: Reader, where: str, vkeys: dict[str, tuple[yaml.Node, yaml.Node]]
) -> tuple[int | None, Autoscale | None]:
    """A version's `replicas: N` or `autoscale: {...}`: servers that `infergate run` starts."""
    replicas = autoscale = None
    if "replicas" in vkeys:
        replicas = _count(r, vkeys["replicas"][1], f"{where}.replicas")
    if "autoscale" in vkeys:
        autoscale = _read_autoscale(r, vkeys["autoscale"][1], f"{where}.autoscale")
        if "replicas" in vkeys:
            r.fail(vkeys["autoscale"][0], where, "give 'replicas' or 'autoscale', not both")
    if ("replicas" in vkeys or "autoscale" in vkeys) and "endpoints" in vkeys:
        r.fail(
            vkeys["endpoints"][0],
            where,
            "give 'endpoints' (servers started elsewhere) or replicas/autoscale "
            "(servers that infergate run starts), not both",
        )
    return replicas, autoscale


def _read_traffic(
    r: Reader,
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


def _read_shadow(r: Reader, where: str, node: yaml.Node, known: set[str]) -> Shadow | None:
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


def _number(
    r: Reader, node: yaml.Node, where: str, low: float, high: float, *, integer: bool = False
) -> float | None:
    """A number in [low, high] (an int if `integer`), or None after reporting a problem."""
    value = r.scalar(node, where)
    kind = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        bound = f"at least {low:g}" if high == float("inf") else f"{low:g}-{high:g}"
        r.fail(node, where, f"must be {what} {bound}, got {value!r}")
        return None
    return value


ROLLOUT_NUMBERS = {  # key: (low, high, integer)
    "min_requests": (1, float("inf"), True),
    "max_error_rate": (0, 1, False),
    "max_p99_ratio": (1, float("inf"), False),
    "failure_limit": (1, float("inf"), True),
}
SHADOW_NUMBERS = {
    "percent": (1, 100, False),
    "min_pairs": (1, float("inf"), True),
    "min_agreement": (0, 1, False),
    "rtol": (0, 1, False),
    "atol": (0, float("inf"), False),
}


def _numbers(
    r: Reader, keys: dict[str, tuple[yaml.Node, yaml.Node]], where: str, rules: dict
) -> dict[str, float]:
    out = {}
    for key, (low, high, integer) in rules.items():
        if key in keys:
            value = _number(r, keys[key][1], f"{where}.{key}", low, high, integer=integer)
            if value is not None:
                out[key] = value
    return out


def _read_rollout(
    r: Reader, where: str, node: yaml.Node, known: set[str], traffic: tuple[tuple[str, int], ...]
) -> Rollout | None:
    """The `rollout` block; the baseline is the one other version with traffic in the file."""
    allowed = {"canary", "shadow", "steps", "interval", "max_p99", "hold_timeout"}
    keys = r.mapping(node, where, allowed | set(ROLLOUT_NUMBERS))
    before = len(r.problems)
    if "canary" not in keys:
        if isinstance(node, yaml.MappingNode):
            r.fail(node, where, "missing required key 'canary'")
        return None
    canary_node = keys["canary"][1]
    canary = r.scalar(canary_node, f"{where}.canary")
    holders = [v for v, w in traffic if w > 0 and v != canary]
    if canary not in known:
        listed = ", ".join(sorted(known))
        r.fail(canary_node, f"{where}.canary", f"unknown version {canary!r} (versions: {listed})")
    elif not holders:
        r.fail(
            canary_node,
            f"{where}.canary",
            f"{canary!r} already has all the traffic, so it equals the baseline",
        )
    elif len(holders) > 1:
        r.fail(
            canary_node,
            f"{where}.canary",
            f"needs one baseline, but traffic gives weight to {', '.join(holders)}",
        )
    values: dict = _numbers(r, keys, where, ROLLOUT_NUMBERS)
    if "steps" in keys:
        steps_node = keys["steps"][1]
        items = r.sequence(steps_node, f"{where}.steps")
        steps = [_number(r, n, f"{where}.steps", 1, 100, integer=True) for n in items]
        if not items:
            r.fail(steps_node, f"{where}.steps", "needs at least one step")
        elif None not in steps and any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            r.fail(steps_node, f"{where}.steps", f"must be increasing, got {steps}")
        values["steps"] = tuple(steps)
    for key in ("interval", "max_p99", "hold_timeout"):
        if key in keys:
            values[key] = r.duration(keys[key][1], f"{where}.{key}")
    hold, interval = values.get("hold_timeout"), values.get("interval", Rollout.interval)
    if hold and interval and hold < interval:
        r.fail(keys["hold_timeout"][1], f"{where}.hold_timeout", "must be at least the interval")
    if "shadow" in keys:
        shadow_keys = r.mapping(keys["shadow"][1], f"{where}.shadow", set(SHADOW_NUMBERS))
        values["shadow"] = RolloutShadow(
            **_numbers(r, shadow_keys, f"{where}.shadow", SHADOW_NUMBERS)
        )
    if len(r.problems) > before:
        return None
    return Rollout(canary=canary, baseline=holders[0], **values)


PRIORITIES = ("low", "normal", "high")
CONSUMERS_KEYS = {"keys_file", "jwt", "priority"}
JWT_KEYS = {"issuer", "audiences", "jwks_file", "consumer_claim"}
# No dots: a bearer token with dots is read as a JWT.
KEY_RE = re.compile(r"^[A-Za-z0-9_~+/=-]{16,256}$")
BAD_KEY = "a key must be 16-256 letters, digits or _-~+/= (no dots, which mark a JWT)"
BAD_CONSUMER = (
    "a consumer name must be lowercase letters, digits, '-' or '_' "
    "(at most 63, starting and ending with a letter or digit)"
)


def _is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def _read_named_file(
    r: Reader, node: yaml.Node, where: str, base: Path, files: list[Path]
) -> tuple[Path, str] | None:
    """The file named at `node`, relative to the routing file's folder, and its text."""
    name = r.scalar(node, where)
    if not isinstance(name, str) or not name:
        r.fail(node, where, f"must be a file name, got {name!r}")
        return None
    path = base / name
    files.append(path)
    try:
        return path, path.read_text()
    except OSError as exc:
        r.fail(node, where, f"cannot read {path}: {exc.strerror}")
        return None


def _read_keys(path: Path, text: str) -> tuple[tuple[tuple[str, str], ...], list[Problem]]:
    """A keys file: `consumer: key` lines (`consumer: [key, ...]` while rotating). Its
    messages never quote a key, nor a name that may be one."""

    def problem(node: yaml.Node, message: str) -> Problem:
        return Problem(str(path), node.start_mark.line + 1, node.start_mark.column + 1, "", message)

    try:
        root = yaml.compose(text, Loader=FAST_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        return (), [Problem(str(path), line, col, "", f"invalid YAML: {exc.problem}")]
    if root is None:
        return (), []  # no keys: nobody authenticates with a key
    if not isinstance(root, yaml.MappingNode):
        return (), [problem(root, "expected 'consumer: key' lines")]
    problems: list[Problem] = []
    pairs: list[tuple[str, str]] = []
    owner: dict[str, str] = {}
    for name_node, value in root.value:
        name = name_node.value if isinstance(name_node, yaml.ScalarNode) else None
        if not isinstance(name, str) or not NAME_RE.match(name):
            problems.append(problem(name_node, BAD_CONSUMER))
            continue
        if name in owner.values():
            problems.append(problem(name_node, f"consumer {name!r} is listed twice"))
            continue
        items = value.value if isinstance(value, yaml.SequenceNode) else [value]
        for item in items:
            key = item.value if isinstance(item, yaml.ScalarNode) else None
            if not isinstance(key, str) or not KEY_RE.match(key):
                problems.append(problem(item, f"{name}: {BAD_KEY}"))
            elif key in owner:
                problems.append(problem(item, f"{name}: the same key as {owner[key]!r}"))
            else:
                owner[key] = name
                pairs.append((name, key))
    return tuple(pairs), problems


def _read_jwks(path: Path, text: str) -> list[Problem]:
    """Problems of a JWKS document (JSON with a non-empty `keys` list)."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        return [Problem(str(path), exc.lineno, exc.colno, "", f"invalid JSON: {exc.msg}")]
    if not isinstance(document, dict) or not document.get("keys"):
        return [Problem(str(path), 1, 1, "", "a JWKS needs a non-empty 'keys' list")]
    return []


def _read_jwt(r: Reader, node: yaml.Node, base: Path, files: list[Path]) -> Jwt | None:
    where = "consumers.jwt"
    keys = r.mapping(node, where, JWT_KEYS)
    missing = [k for k in ("issuer", "jwks_file") if k not in keys]
    for key in missing:
        if isinstance(node, yaml.MappingNode):
            r.fail(node, where, f"missing required key {key!r}")
    if missing:
        return None

    def text(key: str) -> str | None:
        return r.checked(keys[key][1], f"{where}.{key}", _is_text, "a non-empty string")

    issuer = text("issuer")
    claim = text("consumer_claim") if "consumer_claim" in keys else "sub"
    audiences: tuple[str, ...] | None = ()
    if "audiences" in keys:
        audiences = r.names(keys["audiences"][1], f"{where}.audiences")
    read = _read_named_file(r, keys["jwks_file"][1], f"{where}.jwks_file", base, files)
    if read:
        r.problems += _read_jwks(*read)
    if read is None or issuer is None or claim is None or audiences is None:
        return None
    return Jwt(issuer, audiences, read[0], read[1], claim)


def _read_priority(r: Reader, node: yaml.Node, known: frozenset[str] | None) -> dict[str, str]:
    out = {}
    for name, (name_node, level_node) in r.mapping(node, "consumers.priority").items():
        where = f"consumers.priority.{name}"
        if known is not None and name not in known:
            r.fail(name_node, where, f"unknown consumer {name!r}")
        level = r.scalar(level_node, where)
        if level not in PRIORITIES:
            r.fail(level_node, where, f"must be one of {', '.join(PRIORITIES)}, got {level!r}")
        else:
            out[name] = level
    return out


def _read_consumers(r: Reader, node: yaml.Node, base: Path, files: list[Path]) -> Consumers:
    """The `consumers` block, with the keys and JWKS files it names (relative to `base`)."""
    keys = r.mapping(node, "consumers", CONSUMERS_KEYS)
    if isinstance(node, yaml.MappingNode) and not {"keys_file", "jwt"} & keys.keys():
        r.fail(node, "consumers", "needs 'keys_file', 'jwt' or both")
    pairs: tuple[tuple[str, str], ...] = ()
    keys_path = None
    if "keys_file" in keys:
        read = _read_named_file(r, keys["keys_file"][1], "consumers.keys_file", base, files)
        if read:
            keys_path = read[0]
            pairs, problems = _read_keys(*read)
            r.problems += problems
    jwt = _read_jwt(r, keys["jwt"][1], base, files) if "jwt" in keys else None
    consumers = Consumers(pairs, keys_path, jwt)
    if "priority" in keys:
        priority = _read_priority(r, keys["priority"][1], consumers.known)
        consumers = Consumers(pairs, keys_path, jwt, priority)
    return consumers


def _read_access(
    r: Reader, where: str, node: yaml.Node, consumers: Consumers | None
) -> Access | None:
    """A model's `access`: `{consumers: [...]}` or `{public: true}`."""
    keys = r.mapping(node, where, {"consumers", "public"})
    if consumers is None:
        r.fail(node, where, "needs a top-level 'consumers' block (without it all is public)")
        return None
    if len(keys) != 1:
        if isinstance(node, yaml.MappingNode):
            r.fail(node, where, "give either 'consumers: [names]' or 'public: true'")
        return None
    if "public" in keys:
        ok = r.checked(keys["public"][1], f"{where}.public", lambda v: v is True, "true")
        return Access(public=True) if ok else None
    known = consumers.known
    names = []
    for name_node in r.sequence(keys["consumers"][1], f"{where}.consumers"):
        name = r.checked(name_node, f"{where}.consumers", _is_text, "a consumer name")
        if known is not None and name is not None and name not in known:
            listed = ", ".join(sorted(known)) or "none"
            r.fail(name_node, f"{where}.consumers", f"unknown consumer {name!r} (known: {listed})")
        names.append(name)
    if None in names:
        return None
    return Access(consumers=tuple(names))


UPSTREAM_TLS_KEYS = ("cert", "key", "ca", "server_cert", "server_key")


def _read_upstream_tls(r: Reader, node: yaml.Node, folder: Path) -> UpstreamTls | None:
    """`upstream_tls: {cert, key, ca[, server_cert, server_key]}`: PEM files, relative to the
    routing file's folder; every file must be readable and each key fit its certificate."""
    keys = r.mapping(node, "upstream_tls", set(UPSTREAM_TLS_KEYS))
    before = len(r.problems)
    paths: dict[str, Path] = {}
    for key in UPSTREAM_TLS_KEYS:
        if key not in keys:
            if key in ("cert", "key", "ca") and isinstance(node, yaml.MappingNode):
                r.fail(node, "upstream_tls", f"missing required key {key!r}")
            continue
        value_node = keys[key][1]
        value = r.scalar(value_node, f"upstream_tls.{key}")
        if isinstance(value, str) and value:
            paths[key] = folder / value
        elif isinstance(value_node, yaml.ScalarNode):
            r.fail(value_node, f"upstream_tls.{key}", f"expected a file name, got {value!r}")
    if ("server_cert" in keys) != ("server_key" in keys):
        r.fail(node, "upstream_tls", "server_cert and server_key go together")
    if len(r.problems) > before:
        return None
    paths.setdefault("server_cert", paths["cert"])
    paths.setdefault("server_key", paths["key"])
    tls = UpstreamTls(**paths)
    try:
        check(tls)
    except TlsFileError as exc:
        value_node = keys[exc.field][1] if exc.field in keys else node
        r.fail(value_node, f"upstream_tls.{exc.field}", f"{value_node.value!r} {exc}")
        return None
    return tls


# --- limits: what each consumer may spend (docs/api-management.md) -------------------------
RATE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
RATE_RE = re.compile(r"^(-?\d+)\s*/\s*(s|m|h|d)$")
SIZE_RE = re.compile(r"^(-?\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?$")
SIZE_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
SIZE_UNITS |= {"KB": 10**3, "MB": 10**6, "GB": 10**9}
QUOTA_FAILURE_MODES = ("open", "closed")
MAX_U32 = 2**32 - 1  # Envoy's token and circuit-breaker counts are 32-bit


@dataclass(frozen=True)
class Rate:
    """`requests` per `seconds`, written `50/s`, `600/m`, `10000/h` or `1000000/d`."""

    requests: int
    seconds: int


@dataclass(frozen=True)
class Limits:
    """A model's limits per consumer; None: no such limit."""

    rate: Rate | None = None  # each Envoy's token bucket, refilled at this rate
    burst: int | None = None  # the bucket's size (default: one unit's worth of the rate)
    quota: Rate | None = None  # one budget across every Envoy, per fixed window
    max_body: int | None = None  # bytes
    # Requests of `low` consumers in flight per version and Envoy; beyond it they are shed.
    low_priority_requests: int = 16


def _read_rate(r: Reader, node: yaml.Node, where: str) -> Rate | None:
    value = r.scalar(node, where)
    match = RATE_RE.match(value.strip()) if isinstance(value, str) else None
    if not match:
        r.fail(node, where, f"{value!r} is not a rate like 50/s, 600/m, 10000/h or 1000000/d")
        return None
    if not 0 < int(match.group(1)) <= MAX_U32:
        r.fail(node, where, f"{value!r}: the number of requests must be 1-{MAX_U32}")
        return None
    return Rate(int(match.group(1)), RATE_UNITS[match.group(2)])


def _u32(r: Reader, node: yaml.Node, where: str) -> int | None:
    """A count from 1 to MAX_U32."""
    value = _number(r, node, where, 1, float("inf"), integer=True)
    if value is not None and value > MAX_U32:
        r.fail(node, where, f"must be at most {MAX_U32}, got {value}")
        return None
    return value


def _read_size(r: Reader, node: yaml.Node, where: str) -> int | None:
    value = r.scalar(node, where)
    match = SIZE_RE.match(str(value).strip()) if isinstance(value, int | str) else None
    if isinstance(value, bool) or not match or int(match.group(1)) <= 0:
        r.fail(node, where, f"{value!r} is not a positive size like 1MiB, 512KiB or 65536")
        return None
    size = int(match.group(1)) * SIZE_UNITS[match.group(2) or "B"]
    if size > MAX_U32:
        r.fail(node, where, f"{value!r} is over Envoy's largest, 4GiB - 1 byte")
        return None
    return size


def _per_consumer(r: Reader, node: yaml.Node, where: str, extra: set[str]) -> tuple[dict, Rate]:
    keys = r.mapping(node, where, {"per_consumer", *extra})
    rate = None
    if "per_consumer" in keys:
        rate = _read_rate(r, keys["per_consumer"][1], f"{where}.per_consumer")
    elif isinstance(node, yaml.MappingNode):
        r.fail(node, where, "missing required key 'per_consumer'")
    return keys, rate


def read_limits(r: Reader, node: yaml.Node, where: str) -> Limits | None:
    """A model's `limits: {rate: {per_consumer, burst}, quota: {per_consumer}, max_body}`."""
    keys = r.mapping(node, where, {"rate", "quota", "max_body", "low_priority_requests"})
    before = len(r.problems)
    values: dict = {}
    if "rate" in keys:
        rate_keys, values["rate"] = _per_consumer(r, keys["rate"][1], f"{where}.rate", {"burst"})
        if "burst" in rate_keys:
            burst_node = rate_keys["burst"][1]
            values["burst"] = _u32(r, burst_node, f"{where}.rate.burst")
    if "quota" in keys:
        values["quota"] = _per_consumer(r, keys["quota"][1], f"{where}.quota", set())[1]
    if "max_body" in keys:
        values["max_body"] = _read_size(r, keys["max_body"][1], f"{where}.max_body")
    if "low_priority_requests" in keys:
        fieldname = f"{where}.low_priority_requests"
        node = keys["low_priority_requests"][1]
        values["low_priority_requests"] = _u32(r, node, fieldname)
    if len(r.problems) > before:
        return None
    return Limits(**values)


def read_quota_service(r: Reader, node: yaml.Node, where: str) -> str:
    """`quota_service: {on_failure: open|closed}`; open (the default) keeps serving when the
    control plane is down, as Envoy does with the rest of its config."""
    keys = r.mapping(node, where, {"on_failure"})
    if "on_failure" not in keys:
        return "open"
    value = r.scalar(keys["on_failure"][1], f"{where}.on_failure")
    if value not in QUOTA_FAILURE_MODES:
        r.fail(keys["on_failure"][1], f"{where}.on_failure", f"{value!r} is not open or closed")
        return "open"
    return value


def parse(text: str, path: str = "<string>") -> RoutingConfig:
    """Parse routing YAML text; raise ConfigError listing every problem with its position.

    A file in the plain layout is read model by model, and a model whose text, defaults
    and consumers are those of the last parse is not read again; a file with any problem
    is then read again as one document, so that its errors are the same either way."""
    split = model_blocks.split(text)
    if split is not None:
        try:
            return _parse_root(_compose(split[0], path), path, partial(_read_blocks, split[1]))
        except ConfigError:
            pass
    return _parse_root(_compose(text, path), path, _read_models_node)


def _compose(text: str, path: str) -> yaml.Node:
    try:
        root = yaml.compose(text, Loader=FAST_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([Problem(path, line, col, "", f"invalid YAML: {problem}")]) from None
    if root is None:
        raise ConfigError([Problem(path, 1, 1, "", "the file is empty")])
    return root


ModelsReader = Callable[[Reader, yaml.Node, Resilience, "Consumers | None"], list[Model]]


def _read_models_node(
    r: Reader, node: yaml.Node, defaults: Resilience, consumers: Consumers | None
) -> list[Model]:
    models = []
    for mname, (mkey, mnode) in r.mapping(node, "models").items():
        if r.name(mkey, f"models.{mname}", "model"):
            model = _read_model(r, mname, mkey, mnode, defaults, consumers)
            if model:
                models.append(model)
    return models


_last_models: dict[tuple, Model] = {}  # the last parse's models, by their text and context


def _read_blocks(
    blocks: list[model_blocks.Block],
    r: Reader,
    node: yaml.Node,
    defaults: Resilience,
    consumers: Consumers | None,
) -> list[Model]:
    """The models of `blocks`, each composed alone unless the last parse read the same."""
    global _last_models
    models, seen = [], {}
    for block in blocks:
        key = (block.text, defaults, consumers)
        model = _last_models.get(key)
        if model is None:
            mkey, mnode = _compose(block.document(), r.path).value[0][1].value[0]
            if not r.name(mkey, f"models.{block.name}", "model"):
                raise ConfigError(r.problems)
            model = _read_model(r, block.name, mkey, mnode, defaults, consumers)
            if model is None or r.problems:
                raise ConfigError(r.problems)
        seen[key] = model
        models.append(model)
    _last_models = seen
    return models


def _parse_root(root: yaml.Node, path: str, read_models: ModelsReader) -> RoutingConfig:
    r = Reader(path)
    top_keys = {"listen", "models", "resilience", "consumers", "upstream_tls", "quota_service"}
    top = r.mapping(root, "", top_keys)
    files: list[Path] = []  # the keys and JWKS files named, read relative to this file
    consumers = None
    if "consumers" in top:
        consumers = _read_consumers(r, top["consumers"][1], Path(path).parent, files)
    defaults = Resilience()
    if "resilience" in top:
        defaults = read_resilience(r, top["resilience"][1], "resilience", defaults)
    listen = Endpoint("127.0.0.1", 8080)
    if "listen" in top:
        listen = _read_endpoint(r, top["listen"][1], "listen") or listen
    models: list[Model] = []
    if "models" not in top:
        if isinstance(root, yaml.MappingNode):
            r.fail(root, "", "missing required key 'models'")
    else:
        models = read_models(r, top["models"][1], defaults, consumers)
    taken = {listen: "listen"}
    for model in models:
        if model.grpc_listen is None:
            continue
        if model.grpc_listen in taken:
            node = top["models"][1]
            r.fail(
                node,
                f"models.{model.name}.grpc_listen",
                f"{model.grpc_listen} is already used by {taken[model.grpc_listen]}",
            )
        taken[model.grpc_listen] = f"models.{model.name}.grpc_listen"
    upstream_tls = None
    if "upstream_tls" in top:
        folder = Path.cwd() if path == "<string>" else Path(path).resolve().parent
        upstream_tls = _read_upstream_tls(r, top["upstream_tls"][1], folder)
    quota_on_failure = "open"
    if "quota_service" in top:
        quota_on_failure = read_quota_service(r, top["quota_service"][1], "quota_service")
    if r.problems:
        raise ConfigError(r.problems, tuple(files))
    return RoutingConfig(listen, tuple(models), consumers, upstream_tls, quota_on_failure)


def load(path: str | Path) -> RoutingConfig:
    """Read and parse a routing YAML file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        problem = Problem(str(p), 1, 1, "", f"cannot read file: {exc.strerror}")
        raise ConfigError([problem]) from None
    return parse(text, str(p))
