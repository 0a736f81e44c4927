"""Children forked while gRPC is busy start: gRPC's fork handlers are off."""

from __future__ import annotations

import asyncio
import os
import shutil

import grpc

from gateway.processes import Child


async def test_children_started_while_grpc_is_busy_all_reach_their_exec(tmp_path):
    assert os.environ["GRPC_ENABLE_FORK_SUPPORT"] == "0"  # set by `import control_plane`
    server = grpc.aio.server()

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    rpc = grpc.unary_unary_rpc_method_handler(echo)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {"E": rpc}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary("/t.T/E")
    done = asyncio.Event()

    async def busy() -> int:
        calls = 0
        while not done.is_set():
            await call(b"x")
            calls += 1
        return calls

    def start_children() -> list[int | None]:
        exits = []
        for i in range(60):
            child = Child(f"true-{i}", [shutil.which("true")], str(tmp_path / "children.log"))
            exits.append(child.start().proc.wait())
        return exits

    try:
        load = [asyncio.create_task(busy()) for _ in range(4)]
        exits = await asyncio.to_thread(start_children)
        done.set()
        calls = await asyncio.gather(*load)
    finally:
        await channel.close()
        await server.stop(None)
    assert sum(calls) > 100  # gRPC was busy all along
    # With gRPC's fork handlers on, about 30% of these died with SIGABRT (-6) before exec.
    assert exits == [0] * 60, (tmp_path / "children.log").read_text()[-2000:]
