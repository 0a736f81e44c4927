"""Replicas as containers (`infergate run --executor docker`): the `infergate` image on the
host network. Skips without a Docker engine or the image; fails instead when CI=true
(`bash .ci/docker.sh start` enables it)."""

from __future__ import annotations

import subprocess

from gateway.testing import require_docker
from tests.stack import count_versions
from tests.test_supervisor_replicas import Run

CONTAINERS = """\
listen: 127.0.0.1:{listen}
models:
  iris:
    versions:
      v1: {{replicas: 2}}
"""


def containers() -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "--filter", "name=infergate-iris-v1-", "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def test_container_replicas_serve_and_leave_nothing_behind(tmp_path, model_repository):
    require_docker()
    run = Run(tmp_path, model_repository, CONTAINERS, "--executor", "docker")
    try:
        run.wait("2 ready containers", lambda: len(run.ready_addresses("v1")) == 2, timeout=120)
        run.wait("Envoy routes to both", lambda: len(run.healthy_hosts("v1")) == 2)
        assert len(containers()) == 2
        assert count_versions(run.listen, 20) == {"v1": 20}
        run.write(CONTAINERS.replace("replicas: 2", "replicas: 1"))
        run.wait("one drained", lambda: len(run.replicas("v1")) == 1)
        run.wait("its container gone", lambda: len(containers()) == 1)
    finally:
        run.stop()
    assert containers() == []
