"""The `infergate` command line.

Each command imports what it needs: `infergate serve`, a replica's cold start, skips the
control plane's modules (ready 0.1 s sooner, on 20% less CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from control_plane.ports import AddressInUse, ensure_free
from gateway import logs


class CliError(Exception):
    """A mistake in the command line or its files: one line on stderr, exit code 2."""


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port")
    return host, int(port)


def listen_address(text: str) -> str:
    from control_plane.config import parse_endpoint

    try:
        return str(parse_endpoint(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_validate(args: argparse.Namespace) -> int:
    from control_plane.config import ConfigError, load

    try:
        config = load(args.file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        print(f"{args.file}: {len(exc.problems)} problem(s)", file=sys.stderr)
        return 1
    versions = sum(len(m.versions) for m in config.models)
    print(f"{args.file}: valid ({len(config.models)} models, {versions} versions)")
    return 0


def cmd_schema(_: argparse.Namespace) -> int:
    from control_plane.schema import routing_schema

    print(json.dumps(routing_schema(), indent=2))
    return 0


def sample_fraction(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: auto or a fraction in (0, 1]") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: a fraction in (0, 1]")
    return value


def admin_token(args: argparse.Namespace) -> str | None:
    """The admin API's bearer token: --admin-token-file, else $INFERGATE_ADMIN_TOKEN."""
    if getattr(args, "admin_token_file", None):
        try:
            token = Path(args.admin_token_file).read_text().strip()
        except OSError as exc:
            raise CliError(f"cannot read --admin-token-file: {exc}") from None
        if not token:
            raise CliError(f"--admin-token-file {args.admin_token_file} is empty")
        return token
    return os.environ.get("INFERGATE_ADMIN_TOKEN") or None


def cmd_control_plane(args: argparse.Namespace) -> int:
    from control_plane.config import ConfigError
    from control_plane.service import ControlPlane, TlsFiles

    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            print("--tls-cert and --tls-key go together", file=sys.stderr)
            return 2
        ca = Path(args.tls_client_ca) if args.tls_client_ca else None
        tls = TlsFiles(Path(args.tls_cert), Path(args.tls_key), ca)
    plane = ControlPlane(
        Path(args.file),
        args.xds,
        args.admin,
        admin_token(args),
        tls,
        watch_mode=args.watch,
        health_interval=args.health_interval,
        telemetry_sample=None if args.no_telemetry else args.telemetry_sample,
        telemetry_max_rate=args.telemetry_max_rate,
    )
    try:
        asyncio.run(plane.run_forever())
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.registration import Registration
    from model_servers.admin import ServerTls
    from model_servers.server import serve

    tls = None
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        if not (args.tls_cert and args.tls_key):
            print(
                "--tls-cert and --tls-key go together (and --tls-client-ca needs them)",
                file=sys.stderr,
            )
            return 2
        client_ca = Path(args.tls_client_ca) if args.tls_client_ca else None
        tls = ServerTls(Path(args.tls_cert), Path(args.tls_key), client_ca)
    if args.record_answers < 0 or args.record_answers_max_mib < 1:
        print("--record-answers must be >= 0 and --record-answers-max-mib >= 1", file=sys.stderr)
        return 2
    if args.record_answers and args.processes > 1:
        print(
            "--record-answers needs --processes 1 (each process would keep its own log)",
            file=sys.stderr,
        )
        return 2
    ensure_free((args.host, args.port), "model server")
    if args.grpc_port is not None:
        ensure_free((args.host, args.grpc_port), "model server gRPC")
    registration = None
    if args.register_with:
        if not (args.model and args.version):
            print("--register-with needs --model and --version", file=sys.stderr)
            return 2
        token = admin_token(args)
        if not token:
            print(
                "--register-with needs --admin-token-file or INFERGATE_ADMIN_TOKEN", file=sys.stderr
            )
            return 2
        address = f"{args.host}:{args.port}"
        registration = Registration(args.register_with, token, args.model, args.version, address)
        registration.register_when_ready()
    left = threading.Event()

    def leave() -> None:  # on SIGTERM (one process), else on exit; once
        if registration and not left.is_set():
            left.set()
            registration.deregister()

    grace = args.drain_grace
    if grace is None:
        grace = REGISTERED_DRAIN_GRACE if registration else 0.0
    try:
        serve(
            Path(args.repository),
            args.model,
            args.version,
            args.host,
            args.port,
            max_batch_size=args.max_batch_size,
            max_batch_delay_ms=args.max_batch_delay_ms,
            grpc_port=args.grpc_port,
            processes=args.processes,
            workers=args.workers,
            drain_grace=grace,
            on_drain=leave if args.processes == 1 else None,
            record_answers=args.record_answers,
            answers_max_bytes=args.record_answers_max_mib * 1024 * 1024,
            admin_token=admin_token(args),
            tls=tls,
        )
    finally:
        leave()
    return 0


REGISTERED_DRAIN_GRACE = 2.0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from gateway.bootstrap import envoy_bootstrap

    bootstrap = envoy_bootstrap(
        args.node_id, args.xds, args.envoy_admin, delta=args.delta, listen=args.listen
    )
    print(json.dumps(bootstrap, indent=2))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from control_plane.config import ConfigError
    from gateway.executors import DockerExecutor, LocalExecutor
    from gateway.supervisor import RunFolderInUse, StackAddresses, StartFailed, Supervisor

    repository = Path(args.repository)
    executor = (
        DockerExecutor(repository, args.image)
        if args.executor == "docker"
        else LocalExecutor(repository)
    )

    token_file = None
    if args.admin_token_file:
        admin_token(args)  # fails now, in one line, if the file cannot be read
        token_file = Path(args.admin_token_file).resolve()
    addresses = StackAddresses(args.xds, args.admin, args.envoy_admin)
    try:
        Supervisor(
            Path(args.file),
            Path(args.repository),
            Path(args.workdir),
            addresses,
            token_file,
            executor=executor,
            activation_timeout=args.activation_timeout,
        ).run()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except (RunFolderInUse, StartFailed) as exc:
        print(f"infergate run: {exc}", file=sys.stderr)
        return 1
    return 0


def edit_file(path: str, change) -> int:
    """Apply `change(Document)` to the routing file round-trip, validated, atomically; an
    invalid edit leaves the file as it was and says why (exit 1)."""
    from control_plane.config import ConfigError
    from control_plane.yaml_edit import Document, StaleFile, save

    try:
        doc = Document(path)
        change(doc)
        save(doc)
    except ConfigError as exc:
        print(f"not changed, the edit would make the file invalid:\n{exc}", file=sys.stderr)
        return 1
    except KeyError as exc:
        print(f"not changed: {path} has no {exc.args[0]}", file=sys.stderr)
        return 1
    except (StaleFile, OSError) as exc:
        print(f"not changed: {exc}", file=sys.stderr)
        return 1
    print(f"{path}: saved")
    return 0


def _model_key(doc, model: str) -> list[str]:
    if model not in doc.get(["models"]):
        raise KeyError(f"model {model!r}")
    return ["models", model]


def _version_key(doc, model: str, version: str) -> list[str]:
    if version not in doc.get([*_model_key(doc, model), "versions"]):
        raise KeyError(f"version {version!r} of model {model!r}")
    return ["models", model, "versions", version]


def cmd_set_weight(args: argparse.Namespace) -> int:
    traffic = {}
    for item in args.weights:
        version, _, weight = item.partition("=")
        if not weight.isdigit():
            raise CliError(f"{item!r} is not VERSION=WEIGHT with a non-negative integer weight")
        traffic[version] = int(weight)
    return edit_file(
        args.file, lambda doc: doc.set([*_model_key(doc, args.model), "traffic"], traffic)
    )


def cmd_shadow(args: argparse.Namespace) -> int:
    def change(doc) -> None:
        _version_key(doc, args.model, args.version)
        percent = int(args.percent) if args.percent.is_integer() else args.percent
        doc.set(["models", args.model, "shadow"], {"version": args.version, "percent": percent})

    return edit_file(args.file, change)


def cmd_scale(args: argparse.Namespace) -> int:
    def change(doc) -> None:
        doc.set([*_version_key(doc, args.model, args.version), "replicas"], args.replicas)

    return edit_file(args.file, change)


def print_replicas(path: Path) -> None:
    """The replicas that `infergate run` keeps, from its run folder (if it keeps any)."""
    try:
        versions = json.loads(path.read_text())["versions"]
    except (OSError, ValueError, KeyError):
        return
    print(f"{'MODEL/VERSION':24} {'WANTED':7} {'ADDRESS':22} {'STATE':9} {'RESTARTS':9} LAST EXIT")
    for v in versions:
        name, wanted = f"{v['model']}/{v['version']}", v["desired"]
        for r in v["replicas"] or [{"address": "-", "state": "-", "restarts": "-"}]:
            print(
                f"{name:24} {wanted:<7} {r['address']:22} {r['state']:9} {r['restarts']:<9} "
                f"{r.get('last_exit', '')}"
            )


def cmd_status(args: argparse.Namespace) -> int:
    from gateway import observe

    url = args.admin_url.rstrip("/") + "/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            status = json.load(resp)
    except (urllib.error.URLError, OSError) as exc:
        print(f"cannot reach the control plane at {url}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    snap = status.get("snapshot") or {}
    print(f"snapshot {snap.get('version')}")
    error = status["config"].get("error")
    if error:
        print(f"config error (last good config still serving):\n{error['message']}")
    if status.get("versions") is not None:
        print(f"{'MODEL/VERSION':24} {'TAKES':12} {'HEALTHY':9} PROBLEM")
        for v in status["versions"]:
            counts = [c for c in (v["http"], v["grpc"]) if c]
            healthy = sum(c["healthy"] for c in counts)
            total = sum(c["total"] for c in counts)
            down = [p.upper() for p in ("http", "grpc") if v[p] and not v[p]["healthy"]]
            problem = f"no healthy {'/'.join(down)} endpoint" if down else ""
            name = f"{v['model']}/{v['version']}"
            print(f"{name:24} {v['role']:12} {f'{healthy}/{total}':9} {problem}")
    print_replicas(Path(args.workdir) / "replicas.json")
    print(f"{'NODE':24} {'CONNECTED':16} {'TYPE':4} {'ACKED':7} NACK")
    for node in status["nodes"]:
        gone = node["disconnected_for"]  # None while connected
        connected = "yes" if gone is None else f"no, {round(gone)}s ago"
        for name, t in node["types"].items():
            acked = "yes" if observe.acked(node, name, snap.get("types", {}).get(name)) else "no"
            nack = t["nack"]["message"][:60] if t["nack"] else ""
            print(f"{node['node_id']:24} {connected:16} {name:4} {acked:7} {nack}")
    return 0


def _admin_call(url: str, token: str | None = None) -> dict:
    """GET `url`, or POST to it with the bearer token; the admin API's error as a CliError."""
    request = urllib.request.Request(url, method="POST" if token is not None else "GET")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc)["error"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code}"
        raise CliError(message) from None
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"cannot reach the control plane at {url}: {exc}") from None


def _print_rollout(model: str, r: dict) -> None:
    steps = ", ".join(map(str, r["steps"]))
    print(
        f"{model}: {r['phase']}, {r['canary']} over {r['baseline']} at {r['canary_weight']}%, "
        f"step {r['step']} of [{steps}]"
    )
    print(f"  reason: {r['reason']}")
    print(f"  {'TIME':8} {'DECISION':8} {'STEP':4} {'WEIGHT':6} REASON")
    for d in r["history"]:
        at = time.strftime("%H:%M:%S", time.localtime(d["time"]))
        print(f"  {at:8} {d['kind']:8} {d['step']:<4} {d['canary_weight']:<6} {d['reason']}")


def cmd_rollout(args: argparse.Namespace) -> int:
    base = args.admin_url.rstrip("/") + "/rollouts"
    if args.action == "status":
        rollouts = _admin_call(base)["rollouts"]
        if args.model:
            if args.model not in rollouts:
                raise CliError(f"no rollout for model {args.model!r}")
            rollouts = {args.model: rollouts[args.model]}
    else:
        if not args.model:
            raise CliError(f"{args.action} needs a MODEL")
        token = admin_token(args)
        if not token:
            raise CliError("writes need --admin-token-file or INFERGATE_ADMIN_TOKEN")
        quoted = urllib.parse.quote(args.model, safe="")
        rollouts = {args.model: _admin_call(f"{base}/{quoted}/{args.action}", token)["rollout"]}
    if args.json:
        print(json.dumps(rollouts, indent=2))
        return 0
    if not rollouts:
        print("no rollouts")
    for model, r in rollouts.items():
        _print_rollout(model, r)
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from gateway.top import top

    return top(args.admin_url, once=args.once)


def cmd_usage(args: argparse.Namespace) -> int:
    from gateway.top import usage

    return usage(args.admin_url, args.window, args.json)


PREFIXES = {"run": "infergate", "control-plane": "control plane", "serve": "model server"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infergate", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--log-file", help="log here; the terminal gets warnings and errors only, one line each"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a routing YAML file")
    p.add_argument("file")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schema", help="print the JSON Schema of the routing YAML")
    p.set_defaults(func=cmd_schema)

    def xds_admin(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--xds",
            type=host_port,
            default=("127.0.0.1", 18000),
            help="xDS (gRPC) address (default 127.0.0.1:18000)",
        )
        p.add_argument(
            "--admin",
            type=host_port,
            default=("127.0.0.1", 18001),
            help="control-plane admin API address (default 127.0.0.1:18001)",
        )

    p = sub.add_parser("control-plane", help="run the xDS control plane for a routing file")
    p.add_argument("file")
    xds_admin(p)
    p.add_argument(
        "--admin-token-file",
        help="bearer token for admin API writes "
        "(default: $INFERGATE_ADMIN_TOKEN; without one, writes are refused)",
    )
    p.add_argument("--tls-cert", help="serve xDS over TLS with this certificate (PEM)")
    p.add_argument("--tls-key", help="private key of --tls-cert (PEM)")
    p.add_argument("--tls-client-ca", help="require client certificates signed by this CA")
    p.add_argument(
        "--watch",
        choices=("auto", "notify", "poll"),
        default="auto",
        help="how to see edits of the file: kernel notifications, polling, or "
        "notifications with polling as the fallback (default)",
    )
    p.add_argument(
        "--health-interval",
        type=float,
        default=1.0,
        help="seconds between probes of every model server endpoint (0: no probes)",
    )
    p.add_argument(
        "--telemetry-max-rate",
        type=float,
        default=4000.0,
        help="logged requests/s above which Envoys sample (default 4000, measured in "
        "docs/telemetry.md); with a fixed --telemetry-sample, the control plane warns",
    )
    p.add_argument(
        "--telemetry-sample",
        type=sample_fraction,
        default="auto",
        help="fraction of requests Envoy logs to the control plane: auto (default: all "
        "below --telemetry-max-rate, then halved as needed) or a fixed fraction",
    )
    p.add_argument(
        "--no-telemetry", action="store_true", help="Envoys log no requests to the control plane"
    )
    p.set_defaults(func=cmd_control_plane)

    p = sub.add_parser("serve", help="run an Open Inference Protocol model server")
    p.add_argument("--repository", required=True)
    p.add_argument("--model", help="serve this model (default: every model in the repository)")
    p.add_argument("--version", help="serve this version (default: every version)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, help="also serve the KServe V2 gRPC API here")
    p.add_argument(
        "--max-batch-size",
        type=int,
        help="merge up to this many concurrent requests into one predict call "
        "(overrides model-settings.yaml)",
    )
    p.add_argument(
        "--max-batch-delay-ms", type=float, default=0.0, help="how long a batch waits to fill up"
    )
    p.add_argument(
        "--processes", type=int, default=1, help="server processes sharing the port (SO_REUSEPORT)"
    )
    p.add_argument("--workers", type=int, default=4, help="prediction threads per process")
    p.add_argument(
        "--drain-grace",
        type=float,
        default=None,
        help="seconds to keep answering after SIGTERM while readiness reports 503 (default 0; "
        f"{REGISTERED_DRAIN_GRACE:g} with --register-with, which deregisters first, so the "
        "gateway stops routing here before the listener closes)",
    )
    p.add_argument(
        "--register-with",
        metavar="ADMIN_URL",
        help="register with the control plane at this admin URL once ready, and "
        "deregister on exit (token: --admin-token-file or INFERGATE_ADMIN_TOKEN)",
    )
    p.add_argument(
        "--admin-token-file",
        help="the admin token (also $INFERGATE_ADMIN_TOKEN): for --register-with, and "
        "required by repository load/unload and /v2/answers (without one these are open "
        "on a loopback --host and refused on any other)",
    )
    p.add_argument(
        "--record-answers",
        type=int,
        default=0,
        metavar="N",
        help="keep the newest N answers by x-request-id for GET /v2/answers (default: off)",
    )
    p.add_argument(
        "--record-answers-max-mib",
        type=int,
        default=64,
        help="cap on the recorded outputs' size (MiB, default 64)",
    )
    p.add_argument("--tls-cert", help="serve REST and gRPC over TLS with this certificate")
    p.add_argument("--tls-key", help="private key of --tls-cert (PEM)")
    p.add_argument(
        "--tls-client-ca", help="accept only clients with a certificate this CA signed (PEM)"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "bootstrap", help="print an Envoy bootstrap that points at the control plane"
    )
    p.add_argument("--node-id", default="envoy-1")
    p.add_argument("--xds", type=host_port, default=("127.0.0.1", 18000))
    p.add_argument("--envoy-admin", type=host_port, default=("127.0.0.1", 9901))
    p.add_argument("--delta", action="store_true", help="use Delta (incremental) xDS")
    p.add_argument(
        "--listen",
        type=listen_address,
        help="serve the gateway on this ip:port instead of the routing file's `listen` "
        "(for a second Envoy on the same machine)",
    )
    p.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser("run", help="run control plane, Envoy and model servers locally")
    p.add_argument("file")
    p.add_argument("--repository", default="examples/models")
    p.add_argument("--workdir", default="run", help="bootstrap and log files (default ./run)")
    p.add_argument("--envoy-admin", type=host_port, default=("127.0.0.1", 9901))
    xds_admin(p)
    p.add_argument(
        "--admin-token-file",
        help="bearer token for the control plane's admin API writes (self-registration)",
    )
    p.add_argument(
        "--activation-timeout",
        type=float,
        default=25.0,
        help="seconds a request to a version at zero replicas waits for one (default 25)",
    )
    p.add_argument(
        "--executor",
        choices=("local", "docker"),
        default="local",
        help="where replicas run: local processes, or containers of --image (host network)",
    )
    p.add_argument("--image", default="infergate:latest")
    p.set_defaults(func=cmd_run)

    def file_edit(name: str, help: str, func) -> argparse.ArgumentParser:
        """A command that edits a model in the routing file: FILE MODEL, then its own."""
        p = sub.add_parser(name, help=help)
        p.add_argument("file")
        p.add_argument("model")
        p.set_defaults(func=func)
        return p

    p = file_edit("set-weight", "set a model's traffic weights in the routing file", cmd_set_weight)
    p.add_argument("weights", nargs="+", metavar="VERSION=WEIGHT")
    p = file_edit("shadow", "mirror a percent of a model's traffic to a version", cmd_shadow)
    p.add_argument("version")
    p.add_argument("percent", type=float)
    p = file_edit("scale", "set the replicas of a version in the routing file", cmd_scale)
    p.add_argument("version")
    p.add_argument("replicas", type=int)

    p = sub.add_parser("status", help="show what each Envoy has applied")
    p.add_argument("--admin-url", default="http://127.0.0.1:18001")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--workdir", default="run", help="the run folder of infergate run, for its replicas"
    )
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "rollout", help="show a model's canary rollout, or pause, resume, promote or abort it"
    )
    p.add_argument("action", choices=["status", "pause", "resume", "promote", "abort"])
    p.add_argument("model", nargs="?", help="the model (status: all when omitted)")
    p.add_argument("--admin-url", default="http://127.0.0.1:18001")
    p.add_argument("--admin-token-file", help="the admin token (also $INFERGATE_ADMIN_TOKEN)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rollout)

    p = sub.add_parser("top", help="live traffic per model version (refreshes every second)")
    p.add_argument("--admin-url", default="http://127.0.0.1:18001")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("usage", help="requests and rejections per consumer and model")
    p.add_argument("--admin-url", default="http://127.0.0.1:18001")
    p.add_argument("--window", choices=["10s", "60s", "total"], default="60s")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_usage)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_file = args.log_file
    if args.command == "run" and not log_file:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        log_file = str(Path(args.workdir) / "supervisor.log")
    logs.configure(args.log_level, log_file, f"{PREFIXES.get(args.command, args.command)}: ")
    try:
        return args.func(args)
    except (CliError, AddressInUse) as exc:
        print(f"infergate {args.command}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, CliError) else 1


if __name__ == "__main__":
    sys.exit(main())
