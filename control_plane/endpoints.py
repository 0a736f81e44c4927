"""Endpoints that model servers registered at run time, merged into the file's config."""

from __future__ import annotations

from dataclasses import replace

from control_plane.config import Endpoint, RoutingConfig


class UnknownVersion(LookupError):
    pass


class EndpointRegistry:
    def __init__(self) -> None:
        self._endpoints: dict[tuple[str, str], set[Endpoint]] = {}

    def register(self, config: RoutingConfig, model: str, version: str, ep: Endpoint) -> bool:
        """Add an endpoint to a version the config has; False if it was already there."""
        if not any(
            m.name == model and any(v.name == version for v in m.versions) for m in config.models
        ):
            raise UnknownVersion(f"the routing config has no model {model!r} version {version!r}")
        known = self._endpoints.setdefault((model, version), set())
        added = ep not in known
        known.add(ep)
        return added

    def deregister(self, model: str, version: str, ep: Endpoint) -> bool:
        """Remove an endpoint; False if it was not registered."""
        known = self._endpoints.get((model, version), set())
        if ep not in known:
            return False
        known.discard(ep)
        return True

    def as_list(self) -> list[dict[str, str]]:
        return [
            {"model": m, "version": v, "address": str(ep)}
            for (m, v), eps in sorted(self._endpoints.items())
            for ep in sorted(eps, key=str)
        ]

    def merge(self, config: RoutingConfig) -> RoutingConfig:
        """The config with registered endpoints added to their versions."""
        if not self._endpoints:
            return config
        models = []
        for model in config.models:
            versions = []
            for version in model.versions:
                extra = sorted(self._endpoints.get((model.name, version.name), set()), key=str)
                endpoints = version.endpoints + tuple(
                    e for e in extra if e not in version.endpoints
                )
                versions.append(replace(version, endpoints=endpoints))
            models.append(replace(model, versions=tuple(versions)))
        return replace(config, models=tuple(models))
