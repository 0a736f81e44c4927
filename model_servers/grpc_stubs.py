"""Generate (when missing or stale) and import the stubs of grpc_predict_v2.proto.

The generated `grpc_predict_v2_pb2*.py` files sit next to the proto and are git-ignored;
generating them needs grpcio-tools.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

PROTO = Path(__file__).with_name("grpc_predict_v2.proto")
_OUTPUTS = ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2_grpc.py")


def generate() -> None:
    """Run protoc (from grpcio-tools) if the stubs are older than the proto."""
    outputs = [PROTO.with_name(name) for name in _OUTPUTS]
    mtime = PROTO.stat().st_mtime
    if all(p.is_file() and p.stat().st_mtime >= mtime for p in outputs):
        return
    try:
        from grpc_tools import protoc
    except ImportError:
        raise RuntimeError("generating the gRPC stubs needs grpcio-tools") from None
    root = PROTO.parent.parent
    status = protoc.main(
        [
            "protoc",
            f"-I{root}",
            f"--python_out={root}",
            f"--grpc_python_out={root}",
            str(PROTO.relative_to(root)),
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (status {status})")


def load() -> tuple[ModuleType, ModuleType]:
    """The (messages, services) modules."""
    generate()
    return (
        importlib.import_module("model_servers.grpc_predict_v2_pb2"),
        importlib.import_module("model_servers.grpc_predict_v2_pb2_grpc"),
    )
