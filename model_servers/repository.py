"""Model repository on disk: `<repository>/<model>/<version>/` with a model file and an
optional `model-settings.yaml` (see model_servers.settings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from model_servers.runtime_base import ModelLoadError, Runtime
from model_servers.runtimes import load_runtime
from model_servers.settings import ModelSettings, SettingsError, load_settings


class ModelNotFoundError(LookupError):
    """The repository has no such model or version."""


@dataclass(frozen=True)
class LoadedModel:
    """One model version, loaded and ready to predict."""

    name: str
    version: str
    runtime: Runtime
    settings: ModelSettings = field(default_factory=ModelSettings)


def _check_name(kind: str, value: str) -> None:
    if not value or value in (".", "..") or "/" in value or "\\" in value:
        raise ModelNotFoundError(f"invalid {kind} name {value!r}")


def _is_version(path: Path) -> bool:
    """A version folder holds a settings file or a bare `model.joblib`."""
    if (path / "model-settings.yaml").is_file():
        return True
    return (path / "model.joblib").is_file()


def list_models(repository: Path) -> list[str]:
    """Model names in the repository: folders with at least one version."""
    if not Path(repository).is_dir():
        return []
    return sorted(
        p.name
        for p in Path(repository).iterdir()
        if p.is_dir() and list_versions(repository, p.name)
    )


def list_versions(repository: Path, model: str) -> list[str]:
    """Version names of `model`, sorted; raise ModelNotFoundError for an unknown model."""
    _check_name("model", model)
    model_dir = Path(repository) / model
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"model {model!r} not found in repository {repository}")
    return sorted(p.name for p in model_dir.iterdir() if p.is_dir() and _is_version(p))


def load_model(repository: Path, model: str, version: str) -> LoadedModel:
    """Load `<repository>/<model>/<version>/`.

    Raises ModelNotFoundError if absent, ModelLoadError if its settings or files are broken.
    """
    _check_name("version", version)
    available = list_versions(repository, model)
    if version not in available:
        raise ModelNotFoundError(
            f"version {version!r} of model {model!r} not found in {Path(repository) / model} "
            f"(available: {', '.join(available) or 'none'})"
        )
    version_dir = Path(repository) / model / version
    try:
        settings = load_settings(version_dir)
    except SettingsError as exc:
        raise ModelLoadError(str(exc)) from None
    return LoadedModel(model, version, load_runtime(version_dir, settings), settings)
