"""The check in front of every `from_pretrained` our command lines and loaders make on a user's path."""

from __future__ import annotations

from pathlib import Path


class ModelFolderError(FileNotFoundError):
    """A path given as a saved model folder that is not one (missing, or without a config.json)."""


def require_model_folder(path: str | Path, allow_hub_id: bool = False) -> str | Path:
    """`path` as a Path when it is a saved model folder (a folder with a config.json); ModelFolderError otherwise.

    The one check in front of every `from_pretrained` our command lines and loaders make on a user's path
    (`python -m amformers.eval`, `amformers.train.ship`, the examples, `amformers.convert`), so a wrong path
    reads "<folder> has no config.json (not a saved model folder?)" instead of a deep transformers or Hub error.
    With `allow_hub_id`, a string that names no local file and is a valid Hub repo id ("org/name") is returned
    unchanged for `from_pretrained` to download.
    """
    if allow_hub_id and isinstance(path, str) and not Path(path).exists():
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(path)
            return path
        except HFValidationError:
            pass  # "path/to/model", "/abs/path", "./model": meant as a local folder
    path = Path(path)
    if not path.exists():
        raise ModelFolderError(f"{path} does not exist (expected a saved model folder).")
    if not path.is_dir():
        raise ModelFolderError(f"{path} is not a folder (expected a saved model folder).")
    if not (path / "config.json").is_file():
        raise ModelFolderError(f"{path} has no config.json (not a saved model folder?)")
    return path


__all__ = ["ModelFolderError", "require_model_folder"]
