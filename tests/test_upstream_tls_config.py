"""`upstream_tls` in the routing YAML: paths relative to the file, every problem reported
at its `file:line:col`, and a bad edit keeps the last good config (and certificate); the
control plane's own clients of the model servers present the certificate."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from control_plane.config import ConfigError, RolloutShadow, parse
from control_plane.service import ControlPlane
from control_plane.shadow_pairs import ShadowPairs
from control_plane.snapshot import SECRET
from control_plane.upstream_tls import read
from gateway.processes import free_port
from model_servers.admin import ServerTls
from tests.certs import CertificateAuthority
from tests.test_config import BASE
from tests.test_rollout_shadow_pairs import AnswerServer


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """ca.pem, envoy.crt/.key and a second pair other.crt/.key, all signed by ca.pem."""
    ca = CertificateAuthority(tmp_path)
    shutil.copy(ca.path, tmp_path / "ca.pem")
    ca.issue("envoy")
    ca.issue("other")
    return tmp_path


def config(folder: Path, tls: str) -> tuple[str, str]:
    return BASE + f"upstream_tls: {tls}\n", str(folder / "routing.yaml")


def problems(folder: Path, tls: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(*config(folder, tls))
    return [str(p).removeprefix(str(folder) + "/") for p in info.value.problems]


def test_paths_are_relative_to_the_routing_file_and_the_server_pair_defaults_to_the_client(
    folder,
):
    tls = parse(*config(folder, "{cert: envoy.crt, key: envoy.key, ca: ca.pem}")).upstream_tls
    assert tls is not None
    assert (tls.cert, tls.key, tls.ca) == (
        folder / "envoy.crt",
        folder / "envoy.key",
        folder / "ca.pem",
    )
    assert (tls.server_cert, tls.server_key) == (tls.cert, tls.key)
    assert tls.serve_options() == (
        *("--tls-cert", str(folder / "envoy.crt"), "--tls-key", str(folder / "envoy.key")),
        *("--tls-client-ca", str(folder / "ca.pem")),
    )
    own = "{cert: envoy.crt, key: envoy.key, ca: ca.pem, server_cert: other.crt, "
    own += "server_key: other.key}"
    assert parse(*config(folder, own)).upstream_tls.server_cert == folder / "other.crt"


def test_a_file_without_upstream_tls_has_none():
    assert parse(BASE).upstream_tls is None


@pytest.mark.parametrize(
    "tls, expected",
    [
        (
            "{cert: missing.crt, key: envoy.key, ca: ca.pem}",
            "routing.yaml:7:22: upstream_tls.cert: 'missing.crt' cannot be read "
            "(No such file or directory: {folder}/missing.crt)",
        ),
        (
            "{cert: envoy.crt, key: other.key, ca: ca.pem}",
            "routing.yaml:7:38: upstream_tls.key: 'other.key' is not the key of the cert file",
        ),
        (
            "{cert: envoy.crt, key: envoy.key, ca: envoy.key}",
            "routing.yaml:7:53: upstream_tls.ca: 'envoy.key' holds no PEM certificate",
        ),
        (
            "{cert: envoy.crt, key: envoy.key, ca: ca.pem, server_cert: envoy.crt, "
            "server_key: other.key}",
            "routing.yaml:7:97: upstream_tls.server_key: 'other.key' is not the key of the "
            "server_cert file",
        ),
        (
            "{cert: envoy.crt, key: envoy.key}",
            "routing.yaml:7:15: upstream_tls: missing required key 'ca'",
        ),
        (
            "{cert: envoy.crt, key: envoy.key, ca: ca.pem, server_cert: envoy.crt}",
            "routing.yaml:7:15: upstream_tls: server_cert and server_key go together",
        ),
        (
            "{cert: [a], key: envoy.key, ca: ca.pem}",
            "routing.yaml:7:22: upstream_tls.cert: expected a single value, not a list or mapping",
        ),
    ],
)
def test_every_problem_names_its_position(folder, tls, expected):
    (found,) = problems(folder, tls)
    assert found.startswith(expected.format(folder=folder)), found


async def test_a_bad_edit_keeps_the_last_good_config_and_certificate(folder):
    path = folder / "routing.yaml"
    good, _ = config(folder, "{cert: envoy.crt, key: envoy.key, ca: ca.pem}")
    path.write_text(good)
    plane = ControlPlane(path, ("127.0.0.1", free_port()), ("127.0.0.1", free_port()))
    await plane.start()
    try:
        before = plane.cache.snapshot
        assert set(before.types[SECRET].resources) == {"upstream-tls/ca", "upstream-tls/client"}
        path.write_text(config(folder, "{cert: envoy.crt, key: other.key, ca: ca.pem}")[0])
        for _ in range(200):
            if plane.last_error:
                break
            await asyncio.sleep(0.02)
        assert "routing.yaml:7:38: upstream_tls.key" in plane.last_error["message"]
        assert plane.cache.snapshot is before
    finally:
        await plane.stop()


async def test_shadow_pairing_reads_answers_with_the_client_certificate(folder):
    """The rollouts' shadow pairing reads `/v2/answers` over mutual TLS (the health probes
    are checked end to end in test_upstream_tls.py)."""
    tls = parse(*config(folder, "{cert: envoy.crt, key: envoy.key, ca: ca.pem}")).upstream_tls
    client = read(tls).client_context()
    server = ServerTls(tls.cert, tls.key, tls.ca).ssl_context()  # requires a client cert
    primary, shadow = await AnswerServer("v1").start(server), await AnswerServer("v2").start(server)
    pairs = ShadowPairs(lambda: 100.0)
    pairs.tls = client
    try:
        primary.answer("r1", 1, 0.5)
        shadow.answer("r1", 1, 0.5)
        spec = RolloutShadow()
        await pairs.poll("iris", ("v1", [primary.endpoint]), ("v2", [shadow.endpoint]), spec)
        assert pairs.agreement("iris", "v1", "v2", 100.0).pairs == 1
        pairs.tls = None  # without the certificate the servers cannot be read
        primary.answer("r2", 1, 0.5)
        shadow.answer("r2", 1, 0.5)
        await pairs.poll("iris", ("v1", [primary.endpoint]), ("v2", [shadow.endpoint]), spec)
        assert pairs.agreement("iris", "v1", "v2", 100.0).pairs == 1
    finally:
        await pairs.close()
        for answers in (primary, shadow):
            await answers.runner.cleanup()
