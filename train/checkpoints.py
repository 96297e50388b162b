"""Training checkpoints: atomic saves with a manifest, verification, resuming, listing.

A checkpoint (`Accelerator.save_state`) is written to a hidden temporary folder, given a manifest
(`checkpoint.json`: the trainer state and every file's size and SHA-256), fsynced, then renamed into place as
`step_XXXXXXXX/`: it either exists completely or not at all. A missing, truncated or corrupted one is refused
(`CheckpointError`, naming the damaged file) before any heavy work. Resuming restores the Accelerate state and
returns the step and token count to continue from; the run's identity (model, seed, batch layout) is stored in the
manifest and compared on resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from .metrics import log

CHECKPOINT_MANIFEST = "checkpoint.json"
CHECKPOINT_FORMAT = 1
_CHECKPOINT_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that must not be resumed from (missing, incomplete, truncated or corrupted)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def list_checkpoints(checkpoint_root: Path) -> list[tuple[int, Path]]:
    """Completed checkpoints (renamed into place), oldest first. Temporary folders are not listed."""
    if not checkpoint_root.is_dir():
        return []
    found = []
    for child in checkpoint_root.iterdir():
        match = _CHECKPOINT_NAME.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def write_manifest(folder: Path, trainer_state: dict) -> None:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        files[str(path.relative_to(folder))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": CHECKPOINT_FORMAT, "trainer_state": trainer_state, "files": files}
    partial = folder / (CHECKPOINT_MANIFEST + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, folder / CHECKPOINT_MANIFEST)


def verify_checkpoint(folder: Path, check_hashes: bool = True) -> dict:
    """The checkpoint's manifest, after checking every file it lists; CheckpointError names what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist.")
    manifest_path = folder / CHECKPOINT_MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(
            f"checkpoint {folder} has no {CHECKPOINT_MANIFEST}: it was not completely written (or not by this "
            "script). Refusing to resume from it; delete it or pass --resume with an earlier checkpoint."
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files, state = manifest["files"], manifest["trainer_state"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {folder}: {CHECKPOINT_MANIFEST} is corrupt ({error}).") from None
    if manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {folder} has format {manifest.get('format')}, expected {CHECKPOINT_FORMAT}.")
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {name} is missing.")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(
                f"checkpoint {folder} is truncated or damaged: {name} has {size} bytes, the manifest says "
                f"{expected['size']}. Refusing to resume from it; delete it or pass --resume with an earlier "
                "checkpoint."
            )
        if check_hashes and _sha256(path) != expected["sha256"]:
            raise CheckpointError(
                f"checkpoint {folder} is corrupt: the SHA-256 of {name} does not match its manifest. Refusing to "
                "resume from it; delete it or pass --resume with an earlier checkpoint."
            )
    return state


def save_checkpoint(accelerator, checkpoint_root: Path, step: int, trainer_state: dict, keep: int | None) -> Path:
    """Accelerator.save_state into a hidden folder, manifest, fsync, atomic rename, prune to `keep`."""
    final = checkpoint_root / f"step_{step:08d}"
    partial = checkpoint_root / f".step_{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(partial, trainer_state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(checkpoint_root)
        if keep:
            for _, old in list_checkpoints(checkpoint_root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        for stale in checkpoint_root.glob(".step_*.tmp"):  # left behind by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume: str | None, checkpoint_root: Path, check_hashes: bool = True) -> Path | None:
    """The checkpoint --resume means ("latest" or a path), verified; None when there is nothing to resume."""
    if resume is None:
        existing = list_checkpoints(checkpoint_root)
        if existing:
            raise CheckpointError(
                f"{checkpoint_root} already holds checkpoints (latest: step {existing[-1][0]}). Pass --resume to "
                "continue that run, or choose another --output_dir."
            )
        return None
    if resume == "latest":
        existing = list_checkpoints(checkpoint_root)
        if not existing:
            log(f"--resume: no checkpoint in {checkpoint_root}; starting from step 0.")
            return None
        folder = existing[-1][1]
    else:
        folder = Path(resume)
    verify_checkpoint(folder, check_hashes=check_hashes)
    return folder


def run_identity(config: dict, model_config, block_size: int, micro_batches_per_step: int) -> dict:
    """What a checkpoint must share with the run that resumes it: the model's architecture (not the library version
    that wrote it), and the seed and batch layout that fix the data order."""
    fields = json.loads(model_config.to_json_string(use_diff=False))
    return {
        "model_type": config["model_type"],
        "model": {k: v for k, v in fields.items() if k != "transformers_version" and not k.startswith("_")},
        "seed": int(config["training"]["seed"]),
        "block_size": block_size,
        "micro_batches_per_step": micro_batches_per_step,
        "batch_size": int(config["training"]["batch_size"]),
    }


def trainer_state(step: int, tokens_seen: int, identity: dict) -> dict:
    """The manifest's record of where training stands."""
    return {"step": step, "tokens_seen": tokens_seen, "identity": identity, "time": time.time()}


def restore(accelerator, folder: Path, identity: dict) -> tuple[int, int]:
    """Load a verified checkpoint's Accelerate state (model, optimizer, scheduler, RNGs); (step, tokens seen).

    Refuses a checkpoint of another model; warns when the seed or batch layout differ (the data order will not
    match the interrupted run's)."""
    state = verify_checkpoint(folder, check_hashes=False)  # fully checked in resolve_resume
    saved = state["identity"]
    if saved["model_type"] != identity["model_type"] or saved["model"] != identity["model"]:
        raise CheckpointError(
            f"checkpoint {folder} belongs to a different model than this config; resume with the config it was "
            "trained with."
        )
    if {k: v for k, v in saved.items() if k != "model"} != {k: v for k, v in identity.items() if k != "model"}:
        log(
            "warning: seed, block size or batch layout differ from the checkpoint's; the data order will not match "
            "the original run."
        )
    accelerator.load_state(str(folder))
    return int(state["step"]), int(state["tokens_seen"])
