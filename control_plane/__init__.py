"""The xDS control plane.

gRPC's fork handlers are turned off before grpc is imported (every entry point imports
this package first): with them on, a child forked while gRPC threads are busy (a replica,
Envoy or a model server about to be exec'd by `gateway.processes.Child`) often aborts
before its exec (SIGABRT, "epoll_wait error: Bad file descriptor"; grpc/grpc#43055):
62 of 200 forks under load here. We fork only to exec, so they are of no use.
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
