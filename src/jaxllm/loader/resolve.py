"""Turn ``LLM(model=...)`` into a local folder or GGUF file, with errors that say what was wrong."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Only what we load is downloaded: never pickled weights, never remote code.
HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "*.jinja",
    "*.txt",
]


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a folder (HF layout) or a .gguf file
    is_gguf: bool


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _looks_like_hub_id(model: str) -> bool:
    return bool(_HUB_ID.match(model)) and not model.endswith(".gguf")


def resolve_model(model, revision: str | None = None) -> ResolvedModel:
    if isinstance(model, Path):
        model = str(model)
    if not isinstance(model, str) or not model:
        raise TypeError(f"model must be a non-empty str (an HF id, a folder or a .gguf file), got {model!r}")
    p = Path(model).expanduser()
    if p.exists():
        if p.is_file():
            if p.suffix != ".gguf":
                raise ValueError(f"model={model!r} is a file but not a .gguf; pass a folder or a .gguf file")
            return ResolvedModel(p.resolve(), True)
        if not (p / "config.json").exists():
            raise ValueError(f"model={model!r} is a folder without config.json; not an HF checkpoint")
        return ResolvedModel(p.resolve(), False)
    if not _looks_like_hub_id(model):
        raise ValueError(f"model={model!r}: no such file or folder (and it is not an HF id 'org/name')")
    return ResolvedModel(_download(model, revision), False)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        # Offline, only the cache is read: without local_files_only, snapshot_download still asks the
        # hub for the file list when the revision is a commit hash, and fails even when it is cached.
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=bool(constants.HF_HUB_OFFLINE)
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise ValueError(
            f"model={repo_id!r} (revision={revision!r}) is not in the local HF cache and cannot be "
            f"downloaded (offline or unreachable): {e}"
        ) from e
    except HfHubHTTPError as e:
        raise ValueError(f"model={repo_id!r} (revision={revision!r}) could not be fetched: {e}") from e
    except Exception as e:  # huggingface_hub validation errors (bad id format, ...)
        if type(e).__name__ in ("HFValidationError", "RepositoryNotFoundError", "RevisionNotFoundError"):
            raise ValueError(f"model={repo_id!r}: {e}") from e
        raise
    path = Path(folder)
    if not (path / "config.json").exists():
        raise ValueError(f"model={repo_id!r} has no config.json; not a transformers checkpoint")
    return path
