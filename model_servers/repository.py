"""Model repository on disk: `<repository>/<model>/<version>/model.joblib`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model_servers.runtimes import MODEL_FILE, SklearnRuntime


class ModelNotFoundError(LookupError):
    """The repository has no such model or version."""


@dataclass(frozen=True)
class LoadedModel:
    """One model version, loaded and ready to predict."""

    name: str
    version: str
    runtime: SklearnRuntime


def load_model(repository: Path, model: str, version: str) -> LoadedModel:
    """Load `<repository>/<model>/<version>/model.joblib`; raise ModelNotFoundError if absent."""
    for kind, value in (("model", model), ("version", version)):
        if not value or value in (".", "..") or "/" in value or "\\" in value:
            raise ModelNotFoundError(f"invalid {kind} name {value!r}")
    model_dir = Path(repository) / model
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"model {model!r} not found in repository {repository}")
    version_dir = model_dir / version
    if not (version_dir / MODEL_FILE).is_file():
        available = sorted(p.name for p in model_dir.iterdir() if (p / MODEL_FILE).is_file())
        raise ModelNotFoundError(
            f"version {version!r} of model {model!r} not found in {model_dir} "
            f"(available: {', '.join(available) or 'none'})"
        )
    return LoadedModel(model, version, SklearnRuntime.load(version_dir))
