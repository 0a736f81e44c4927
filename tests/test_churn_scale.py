"""Churn at scale: 200 models, random one-model edits under steady traffic to one of them,
with a real Envoy in both modes. No request may fail, and Envoy must end on exactly the
latest snapshot (clusters, endpoints and routes)."""

from __future__ import annotations

import os
import random
import time

import pytest

from tests.stack import LoadLoop, Stack
from tests.test_churn import assert_envoy_holds

MODELS = 200
EDITS = int(os.environ.get("CHURN_SCALE_EDITS", "40"))


class ScaleConfig:
    """iris (which gets the traffic) and 199 other models, edited one model at a time."""

    def __init__(self, rng: random.Random, stack: Stack):
        self.rng = rng
        self.listen = stack.listen
        self.ports = [p for ports in stack.model_ports.values() for p in ports]
        names = ["iris"] + [f"m{i:03d}" for i in range(MODELS - 1)]
        self.models = {name: self.random_model() for name in names}

    def random_model(self) -> list[str]:
        """One model's YAML lines: versions on random endpoints, weights, maybe a shadow."""
        versions = self.rng.sample(["v1", "v2", "v3"], self.rng.randint(1, 3))
        weights = {v: self.rng.choice([0, 1, 10, 50, 90]) for v in versions}
        if not any(weights.values()):
            weights[versions[0]] = 100
        lines = ["    versions:"]
        for v in versions:
            chosen = self.rng.sample(self.ports, self.rng.randint(1, len(self.ports)))
            lines.append(
                f"      {v}: {{endpoints: [{', '.join(f'127.0.0.1:{p}' for p in chosen)}]}}"
            )
        lines.append("    traffic: {" + ", ".join(f"{v}: {w}" for v, w in weights.items()) + "}")
        if self.rng.random() < 0.3:
            lines.append(f"    shadow: {{version: {self.rng.choice(versions)}, percent: 10}}")
        return lines

    def edit(self) -> str:
        """Change one model (iris in one edit of four), return the whole file."""
        names = list(self.models)
        name = "iris" if self.rng.random() < 0.25 else self.rng.choice(names[1:])
        self.models[name] = self.random_model()
        return self.text()

    def text(self) -> str:
        """Active health checks on iris only: 600 checked clusters would load the machine,
        and only iris's warm-up can fail a request."""
        lines = [f"listen: 127.0.0.1:{self.listen}", "resilience: {health_check: false}"]
        lines.append("models:")
        for name, body in self.models.items():
            lines += [f"  {name}:", *body]
            if name == "iris":
                lines.append("    resilience: {health_check: true}")
        return "\n".join(lines) + "\n"


@pytest.mark.parametrize("mode", ["sotw", "delta"])
def test_one_model_edits_at_200_models_under_traffic(
    tmp_path, model_repository, envoy_binary, mode
):
    seed = int(os.environ.get("CHURN_SEED", str(time.time_ns() % 10**6)))
    rng = random.Random(seed)
    stack = Stack(tmp_path, model_repository, delta=mode == "delta")
    try:
        stack.start_models()
        config = ScaleConfig(rng, stack)
        text = config.text()
        stack.write(text)
        stack.start_control_plane()
        stack.start_envoy()
        stack.wait_converged(timeout=30)
        with LoadLoop(stack.listen, threads=2) as load:
            for _ in range(EDITS):
                text = config.edit()
                stack.write(text)
                time.sleep(rng.choice([0.0, 0.02, 0.1, 0.2]))
            started = time.time()
            time.sleep(0.1)
            status = stack.wait_converged(timeout=30, after=started - 1)
        assert load.failures() == [], f"seed {seed}"
        assert len(load.results) > 100, seed
        assert_envoy_holds(stack, text, status, seed)
    finally:
        stack.stop()
