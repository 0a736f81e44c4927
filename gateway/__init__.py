"""Envoy, the processes around it, and the `infergate` CLI."""

import control_plane  # noqa: F401 (turns gRPC's fork handlers off before grpc is imported)
