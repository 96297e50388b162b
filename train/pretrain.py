"""One pretraining loop for every amformers family, on Accelerate.

    accelerate launch -m amformers.train.pretrain --config train/configs/attn_stream-8m.yaml --output_dir runs/a8m
    python -m amformers.train.pretrain --config train/configs/tiny-attn_stream.yaml --max_steps 20
    accelerate launch --config_file train/accelerate/fsdp.yaml -m amformers.train.pretrain \
        --config train/configs/attn_stream-1b.yaml --output_dir runs/a1b --resume

The YAML names a `model_type` and a `model:` dict of config fields; the model is
`AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **model))` after `import amformers`,
so every registered family trains through this same loop. Scaling past one machine is Accelerate's
job (DDP, FSDP, DeepSpeed through `accelerate launch --config_file`); nothing here is distributed by hand.

What the loop guarantees:
- token-exact loss under gradient accumulation and data parallelism: each micro-batch's summed
  cross-entropy is divided by the number of target tokens of the whole optimizer step on all
  processes (`num_items_in_batch`), so N processes x 1 micro-batch == 1 process x N micro-batches;
- deterministic data order given the seed: blocks are shuffled by (seed, epoch) only, and a resumed
  run skips exactly the micro-batches already consumed, so a run killed with `kill -9` and resumed
  with --resume logs the same losses as an uninterrupted run;
- checkpoints (Accelerator.save_state) are written to a hidden temporary folder, given a manifest of
  file sizes and SHA-256 sums, then renamed: a checkpoint either exists completely or not at all, and
  a truncated or corrupted one is refused on resume with a message naming the damaged file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

LOG_PREFIX = "[pretrain]"
CHECKPOINT_MANIFEST = "checkpoint.json"
CHECKPOINT_FORMAT = 1
_CHECKPOINT_NAME = re.compile(r"^step_(\d{8})$")

TOP_LEVEL_KEYS = {
    "description",
    "model_type",
    "model",
    "attn_implementation",
    "tokenizer",
    "data",
    "training",
    "card",
    "generation",
}
TRAINING_DEFAULTS = {
    "seed": 0,
    "batch_size": 32,
    "eval_batch_size": None,
    "gradient_accumulation_steps": 1,
    "max_steps": 1000,
    "learning_rate": 1e-3,
    "min_lr_ratio": 0.1,
    "warmup_steps": 100,
    "weight_decay": 0.1,
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "adam_epsilon": 1e-8,
    "fused_adamw": True,
    "max_grad_norm": 1.0,
    "mixed_precision": None,  # None: as `accelerate launch` says (its config file or --mixed_precision)
    "gradient_checkpointing": False,
    "log_every": 10,
    "eval_every": 500,
    "eval_batches": 50,
    "save_every": 1000,
    "save_total_limit": 3,
    "num_workers": 0,
}
# A `training` value must have its default's type ("float" also takes an int, and a string that reads as a number:
# PyYAML leaves `1e-3` a string, only `1.0e-3` is a float); these may also be null. mixed_precision has its own check.
TRAINING_NULLABLE = {"eval_batch_size": "int", "max_grad_norm": "float"}
_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false"}
CARD_DEFAULTS = {"license": "apache-2.0", "language": ["en"], "datasets": [], "tags": ["amformers"]}
GENERATION_DEFAULTS = {
    "prompts": ["Once upon a time"],
    "max_new_tokens": 64,
    "do_sample": True,
    "temperature": 0.8,
    "top_k": 40,
}
MIXED_PRECISION = (None, "no", "bf16", "fp16")
HUB_IGNORE_PATTERNS = ["checkpoints/*", ".*", "**/.*"]
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "model_card_template.md"


class CheckpointError(RuntimeError):
    """A checkpoint that must not be resumed from (missing, incomplete, truncated or corrupted)."""


def log(message: str) -> None:
    print(f"{LOG_PREFIX} {message}", flush=True)


# ----------------------------------------------------------------------------------------------------
# Configuration


def _set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: `{key}` is not a section.")
    node[keys[-1]] = value


def _unknown_keys_error(where: str, unknown, known, shown=None, shown_note: str = "") -> ValueError:
    """A ValueError naming each unknown key, with the closest known name when one is close enough; the message
    lists `shown` (default: every known key)."""
    names = []
    for key in sorted(map(str, unknown)):
        close = difflib.get_close_matches(key, [str(k) for k in known], n=1)
        names.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    return ValueError(
        f"{where}: unknown key(s) {', '.join(names)}; known: {sorted(known if shown is None else shown)}{shown_note}."
    )


def _checked_value(name: str, value, kind: str):
    """`value` as type `kind` ("int", "float", "bool", optionally "|None") for the key `name` (e.g.
    "training.batch_size"); a clear error otherwise."""
    base, _, nullable = kind.partition("|")
    if value is None and nullable:
        return None
    if base == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base == "bool" and isinstance(value, bool):
        return value
    if base == "float" and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return value
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    expected = _TYPE_NAMES[base] + (" or null" if nullable else "")
    raise ValueError(f"{name} must be {expected}, got {value!r} ({type(value).__name__}).")


def model_config_class(model_type: str):
    """The config class registered with transformers' AutoConfig for `model_type` (after `import amformers`)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    import amformers  # noqa: F401  (registers every family with the Auto classes)

    try:
        return CONFIG_MAPPING[model_type]
    except KeyError:
        raise ValueError(
            f"model_type {model_type!r} is not registered with transformers' AutoConfig; "
            "`import amformers` registers the families this package ships."
        ) from None


def model_config_keys(model_type: str) -> set[str]:
    """The keys a `model:` section may set: the fields of the family's config class (AttnStreamConfig,
    PalimpsaConfig, ...; their docstrings document each one), inherited PreTrainedConfig fields included."""
    return {field.name for field in dataclasses.fields(model_config_class(model_type))}


def _generic_config_keys() -> set[str]:
    """Fields every transformers config has (dtype, architectures, ...), left out of the listed model keys."""
    from transformers import PreTrainedConfig

    return {field.name for field in dataclasses.fields(PreTrainedConfig)}


def load_config(path: str | Path, overrides: list[str] = ()) -> dict:
    """Read a pretraining YAML, apply `key.sub=value` overrides, check the keys and types, fill the defaults."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path} does not exist.")
    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle) or {}
    if not isinstance(config, dict):
        raise ValueError(f"config {path} must be a YAML mapping.")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE (dotted key, YAML value), got {item!r}.")
        key, value = item.split("=", 1)
        _set_dotted(config, key.strip(), yaml.safe_load(value))
    unknown = set(config) - TOP_LEVEL_KEYS
    if unknown:
        raise ValueError(f"config {path}: unknown top-level key(s) {sorted(unknown)}; known: {sorted(TOP_LEVEL_KEYS)}.")
    if not config.get("model_type"):
        raise ValueError(f"config {path}: `model_type` is required (e.g. attn_stream, palimpsa).")
    if not isinstance(config.get("model") or {}, dict):
        raise ValueError(f"config {path}: `model` must be a mapping of config fields.")
    known_model_keys = model_config_keys(config["model_type"])
    unknown = set(config.get("model") or {}) - known_model_keys
    if unknown:
        generic = _generic_config_keys()
        raise _unknown_keys_error(
            f"config {path}: `model` ({model_config_class(config['model_type']).__name__})",
            unknown,
            known_model_keys,
            shown=known_model_keys - generic,
            shown_note=" and PreTrainedConfig's generic fields" if known_model_keys & generic else "",
        )
    for section, defaults in (("training", TRAINING_DEFAULTS), ("card", CARD_DEFAULTS)):
        given = config.get(section) or {}
        unknown = set(given) - set(defaults)
        if unknown:
            raise _unknown_keys_error(f"config {path}: `{section}`", unknown, defaults)
        config[section] = {**defaults, **given}
    given = config.get("generation") or {}
    unknown = set(given) - set(GENERATION_DEFAULTS)
    if unknown:
        raise _unknown_keys_error(f"config {path}: `generation`", unknown, GENERATION_DEFAULTS)
    config["generation"] = {**GENERATION_DEFAULTS, **given}
    config["model"] = config.get("model") or {}
    config.setdefault("tokenizer", "default")
    config.setdefault("attn_implementation", None)
    config.setdefault("description", f"{config['model_type']} model pretrained with amformers")
    training = config["training"]
    for key, default in TRAINING_DEFAULTS.items():
        if key in TRAINING_NULLABLE:
            kind = TRAINING_NULLABLE[key] + "|None"
        elif default is None:
            continue
        else:
            kind = {bool: "bool", int: "int", float: "float"}[type(default)]
        training[key] = _checked_value(f"config {path}: training.{key}", training[key], kind)
    if training["mixed_precision"] is False:  # YAML 1.1 reads a bare `no` as false
        training["mixed_precision"] = "no"
    if training["mixed_precision"] not in MIXED_PRECISION:
        raise ValueError(f"training.mixed_precision must be one of {MIXED_PRECISION}.")
    for key in ("batch_size", "gradient_accumulation_steps", "max_steps", "log_every"):
        if training[key] < 1:
            raise ValueError(f"training.{key} must be at least 1, got {training[key]}.")
    return config


def build_model_config(config: dict, tokenizer=None):
    """AutoConfig for the YAML's family; token ids come from the tokenizer unless the YAML pins them."""
    from transformers import AutoConfig

    import amformers  # noqa: F401  (registers every family with the Auto classes)

    fields = dict(config["model"])
    if tokenizer is not None:
        fields.setdefault("vocab_size", len(tokenizer))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            fields.setdefault(name, getattr(tokenizer, name))
        if len(tokenizer) > fields["vocab_size"]:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size is {fields['vocab_size']}."
            )
    try:
        return AutoConfig.for_model(config["model_type"], **fields)
    except ValueError as error:
        if "Unrecognized model identifier" in str(error) or "model_type" in str(error):
            raise ValueError(
                f"model_type {config['model_type']!r} is not registered with transformers' AutoConfig; "
                "`import amformers` registers the families this package ships."
            ) from error
        raise


def build_model(model_config, attn_implementation: str | None = None, device: str | None = None):
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    context = torch.device(device) if device else contextlib.nullcontext()
    with context:
        return AutoModelForCausalLM.from_config(model_config, **kwargs)


def count_parameters(model) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return model.num_parameters()


# ----------------------------------------------------------------------------------------------------
# Checkpoints


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


# ----------------------------------------------------------------------------------------------------
# Metrics


class MetricsLog:
    """JSON Lines records ({"type": "train"|"eval"|"summary", "step": ...}), appended and flushed."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """On resume: drop what the interrupted run logged after its checkpoint (it will be redone)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if record.get("type") in ("train", "eval") and record.get("step", 0) <= step:
                    kept.append(line)
        partial = self.path.with_suffix(".partial")
        partial.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(partial, self.path)

    def write(self, records: list[dict]) -> None:
        if not self.enabled or not records:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
            handle.flush()

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_training_curve(records: list[dict], path: Path, title: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train"]
    evals = [(r["step"], r["val_loss"]) for r in records if r.get("type") == "eval"]
    if not train:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(*zip(*train), lw=0.8, alpha=0.8, label="train")
    if evals:
        axis.plot(*zip(*evals), "o-", ms=3, label="validation")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy (nats / token)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ----------------------------------------------------------------------------------------------------
# Training


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms, biases, gates and other vectors)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Positions that contribute to the causal LM loss (the model shifts labels left by one)."""
    return (labels[:, 1:] != -100).sum()


def accumulate_gradients(accelerator, model, batches: list[dict]) -> tuple[torch.Tensor, float]:
    """Forward and backward over this process's micro-batches of one optimizer step, token-exactly.

    Each micro-batch's loss is its summed cross-entropy divided by the target tokens of the *whole* step
    on all processes (`num_items_in_batch`), so the gradients add up to those of the mean loss over every
    token of the step, however the tokens are split into micro-batches and processes. Returns this
    process's share of that mean loss (sum over processes = the step's loss) and the forward+backward time.
    """
    accumulation, world = accelerator.gradient_accumulation_steps, accelerator.num_processes
    items = accelerator.reduce(sum(_target_tokens(b["labels"]) for b in batches), reduction="sum")
    step_loss = torch.zeros((), device=accelerator.device)
    seconds = 0.0
    for batch in batches:
        with accelerator.accumulate(model):
            start = time.perf_counter()
            outputs = model(
                input_ids=batch["input_ids"], labels=batch["labels"], num_items_in_batch=items, use_cache=False
            )
            # Accelerate divides the loss by the accumulation steps and DDP averages the gradients over the
            # processes; both would turn the token-weighted sum back into a mean of means, so undo them.
            accelerator.backward(outputs.loss * (accumulation * world))
            seconds += time.perf_counter() - start
            step_loss += outputs.loss.detach().float()
    return step_loss, seconds


@torch.no_grad()
def evaluate(accelerator, model, loader, max_batches: int | None) -> float | None:
    """Token-weighted mean cross-entropy over the validation blocks (exact across processes).

    `max_batches` counts batches over all processes together (the prepared loader deals batches to the
    processes in turn), so N processes score the same blocks as one.
    """
    if loader is None:
        return None
    if max_batches:
        max_batches = -(-max_batches // accelerator.num_processes)
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    total_tokens = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for index, batch in enumerate(loader):
        if max_batches and index >= max_batches:
            break
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        labels = batch["labels"][:, 1:]
        losses = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none"
        ).view(labels.shape)
        per_sample = torch.stack([losses.sum(1).double(), (labels != -100).sum(1).double()], dim=1)
        per_sample = accelerator.gather_for_metrics(per_sample)
        total_loss += per_sample[:, 0].sum()
        total_tokens += per_sample[:, 1].sum()
    model.train()
    return float(total_loss / total_tokens) if total_tokens > 0 else None


def _micro_batches(accelerator, loader, sampler, start: int):
    """Micro-batches forever, epoch after epoch, starting after the first `start` ones (per process)."""
    per_epoch = len(loader)
    epoch, skip = divmod(start, per_epoch)
    while True:
        current = accelerator.skip_first_batches(loader, skip) if skip else loader
        # DataLoaderShard re-seeds the sampler from its own epoch counter at each `iter`; pin both.
        current.set_epoch(epoch)
        sampler.set_epoch(epoch)
        yield from current
        epoch, skip = epoch + 1, 0


def _model_fields(model_config) -> dict:
    """The architecture, as compared on resume (not the library version that wrote it)."""
    fields = json.loads(model_config.to_json_string(use_diff=False))
    return {k: v for k, v in fields.items() if k != "transformers_version" and not k.startswith("_")}


def train(args, config: dict) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from .data import DataConfig, EpochShuffleSampler, build_datasets, collate_blocks, dataset_summary
    from .tokenizer import load_tokenizer

    training = config["training"]
    output_dir = Path(args.output_dir)
    checkpoint_root = output_dir / "checkpoints"
    # Refuse a bad checkpoint before any heavy work. Only the first process reads every byte to check the
    # SHA-256 sums; the others check the sizes (a failing process stops the whole launch).
    first_process = os.environ.get("RANK", "0") == "0"
    resume_from = resolve_resume(args.resume, checkpoint_root, check_hashes=first_process)

    accumulation = int(training["gradient_accumulation_steps"])
    accelerator = Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accumulation, sync_with_dataloader=False),
        mixed_precision=training["mixed_precision"],
        step_scheduler_with_optimizer=False,
        cpu=args.cpu,
    )
    is_main = accelerator.is_main_process
    world = accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != world:  # e.g. an FSDP config launched on a machine without GPUs: N copies of one run
        raise RuntimeError(
            f"{launched} processes were launched but Accelerate set up {world} ({accelerator.distributed_type}); "
            "they would overwrite each other's files. On CPU-only machines launch with `accelerate launch "
            "--multi_gpu --num_processes N ... --cpu` (DDP over gloo); FSDP and DeepSpeed need GPUs."
        )
    seed = int(training["seed"])
    set_seed(seed)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        with open(output_dir / "train_config.yaml", "w", encoding="utf-8") as handle:
            yaml.safe_dump(config, handle, sort_keys=False)

    tokenizer = load_tokenizer(config["tokenizer"])
    model_config = build_model_config(config, tokenizer)
    data_config = DataConfig.from_dict(config["data"])
    with accelerator.main_process_first():
        train_blocks, valid_blocks = build_datasets(data_config, tokenizer, seed)
    if is_main:
        log(f"data: train {dataset_summary(train_blocks)}, validation {dataset_summary(valid_blocks)}")

    model = build_model(model_config, config["attn_implementation"])
    if training["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    parameters = count_parameters(model)
    if is_main:
        log(f"model: {config['model_type']}, parameters: {parameters}, processes: {world}")

    optimizer = torch.optim.AdamW(
        parameter_groups(model, float(training["weight_decay"])),
        lr=float(training["learning_rate"]),
        betas=(float(training["adam_beta1"]), float(training["adam_beta2"])),
        eps=float(training["adam_epsilon"]),
        fused=bool(training["fused_adamw"]),  # one kernel per group: 3-10x faster than the per-tensor loop
    )
    max_steps = int(training["max_steps"])
    scheduler = get_scheduler(
        "cosine_with_min_lr",
        optimizer,
        num_warmup_steps=int(training["warmup_steps"]),
        num_training_steps=max_steps,
        scheduler_specific_kwargs={"min_lr_rate": float(training["min_lr_ratio"])},
    )
    batch_size = int(training["batch_size"])
    sampler = EpochShuffleSampler(len(train_blocks), seed)
    train_loader = DataLoader(
        train_blocks,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_blocks,
        num_workers=int(training["num_workers"]),
    )
    valid_loader = None
    if valid_blocks is not None:
        valid_loader = DataLoader(
            valid_blocks,
            batch_size=int(training["eval_batch_size"] or batch_size),
            shuffle=False,
            collate_fn=collate_blocks,
        )
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if valid_loader is not None:
        valid_loader = accelerator.prepare(valid_loader)
    if len(train_loader) == 0:
        raise ValueError(
            f"{len(train_blocks)} training blocks cannot fill one batch of {batch_size} on each of {world} "
            "processes: add data, or lower training.batch_size or data.block_size."
        )

    run_identity = {
        "model_type": config["model_type"],
        "model": _model_fields(model_config),
        "seed": seed,
        "block_size": data_config.block_size,
        "micro_batches_per_step": world * accumulation,
        "batch_size": batch_size,
    }
    metrics = MetricsLog(output_dir / "metrics.jsonl", enabled=is_main)
    step, tokens_seen = 0, 0
    if resume_from is not None:
        state = verify_checkpoint(resume_from, check_hashes=False)  # fully checked in resolve_resume
        if state["identity"]["model_type"] != run_identity["model_type"] or (
            state["identity"]["model"] != run_identity["model"]
        ):
            raise CheckpointError(
                f"checkpoint {resume_from} belongs to a different model than this config; resume with the config "
                "it was trained with."
            )
        if {k: v for k, v in state["identity"].items() if k != "model"} != {
            k: v for k, v in run_identity.items() if k != "model"
        }:
            log(
                "warning: seed, block size or batch layout differ from the checkpoint's; the data order will not "
                "match the original run."
            )
        accelerator.load_state(str(resume_from))
        step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
        metrics.truncate_after(step)
        if is_main:
            log(f"resumed from {resume_from} at step {step}")
    elif is_main:
        metrics.path.unlink(missing_ok=True)

    block_size = data_config.block_size
    tokens_per_step = world * accumulation * batch_size * block_size
    stream = _micro_batches(accelerator, train_loader, sampler, step * accumulation)
    eval_every, save_every = int(training["eval_every"]), int(training["save_every"])
    log_every = int(training["log_every"])
    max_grad_norm = float(training["max_grad_norm"] or 0.0)

    def trainer_state() -> dict:
        return {"step": step, "tokens_seen": tokens_seen, "identity": run_identity, "time": time.time()}

    pending: list[tuple[int, torch.Tensor, torch.Tensor | None, float, float]] = []

    def flush_metrics() -> dict | None:
        """Reduce the buffered per-step losses across processes (one collective) and write them."""
        nonlocal pending
        if not pending:
            return None
        losses = accelerator.reduce(torch.stack([p[1] for p in pending]), reduction="sum").tolist()
        records = []
        for (logged_step, _, norm, lr, seconds), loss in zip(pending, losses):
            records.append(
                {
                    "type": "train",
                    "step": logged_step,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": None if norm is None else float(norm),
                    "tokens": tokens_per_step * logged_step,
                    "tokens_per_second": tokens_per_step / seconds if seconds > 0 else None,
                }
            )
        metrics.write(records)
        pending = []
        return records[-1]

    progress = tqdm(total=max_steps, initial=step, disable=not is_main, desc="pretrain", dynamic_ncols=True)
    timed_steps, timed_seconds, timed_forward_backward, timed_data, timed_update = 0, 0.0, 0.0, 0.0, 0.0
    first_step_of_process = True
    last_val_loss, last_eval_step = None, None
    model.train()
    while step < max_steps:
        step_start = time.perf_counter()
        batches = [next(stream) for _ in range(accumulation)]
        data_seconds = time.perf_counter() - step_start
        step_loss, forward_backward = accumulate_gradients(accelerator, model, batches)
        update_start = time.perf_counter()
        grad_norm = None
        if max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            grad_norm = grad_norm.detach() if torch.is_tensor(grad_norm) else grad_norm
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        update_seconds = time.perf_counter() - update_start
        step += 1
        tokens_seen += tokens_per_step
        pending.append((step, step_loss, grad_norm, scheduler.get_last_lr()[0], time.perf_counter() - step_start))
        progress.update(1)
        saving = save_every > 0 and (step % save_every == 0 or step == max_steps)
        if step % log_every == 0 or step == max_steps or saving:
            last = flush_metrics()
            if last is not None:
                progress.set_postfix(
                    loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", tok_s=f"{last['tokens_per_second'] or 0:.0f}"
                )
        if not first_step_of_process:  # the first step pays one-off costs (allocations, data iterator)
            timed_steps += 1
            timed_seconds += time.perf_counter() - step_start  # evaluation and checkpoints are not counted
            timed_forward_backward += forward_backward
            timed_data += data_seconds
            timed_update += update_seconds
        first_step_of_process = False
        if eval_every > 0 and valid_loader is not None and (step % eval_every == 0 or step == max_steps):
            last_val_loss, last_eval_step = (
                evaluate(accelerator, model, valid_loader, int(training["eval_batches"])),
                step,
            )
            if last_val_loss is not None:
                metrics.write(
                    [
                        {
                            "type": "eval",
                            "step": step,
                            "val_loss": last_val_loss,
                            "val_perplexity": math.exp(last_val_loss),
                        }
                    ]
                )
                if is_main:
                    progress.write(f"{LOG_PREFIX} step {step}: validation loss {last_val_loss:.4f}")
        if saving:
            save_checkpoint(accelerator, checkpoint_root, step, trainer_state(), int(training["save_total_limit"]))
    flush_metrics()
    progress.close()

    summary = {
        "type": "summary",
        "step": step,
        "parameters": parameters,
        "processes": world,
        "tokens_per_step": tokens_per_step,
        "timed_steps": timed_steps,
        "train_seconds": timed_seconds,
        "forward_backward_seconds": timed_forward_backward,
        "data_seconds": timed_data,  # fetching and collating the micro-batches
        "optimizer_seconds": timed_update,  # clipping, AdamW, scheduler, zero_grad
        "tokens_per_second": tokens_per_step * timed_steps / timed_seconds if timed_seconds else None,
        "overhead_fraction": 1 - timed_forward_backward / timed_seconds if timed_seconds else None,
    }
    metrics.write([summary])
    if is_main and timed_steps:
        log(
            f"throughput: {summary['tokens_per_second']:.0f} tokens/s over {timed_steps} steps; "
            f"{100 * summary['overhead_fraction']:.1f}% of step time outside forward/backward"
        )

    if valid_loader is not None and last_eval_step != step:  # e.g. evaluation off, or resumed at max_steps
        last_val_loss = evaluate(accelerator, model, valid_loader, int(training["eval_batches"]))
        if last_val_loss is not None:
            metrics.write(
                [{"type": "eval", "step": step, "val_loss": last_val_loss, "val_perplexity": math.exp(last_val_loss)}]
            )
    export_final_model(
        accelerator,
        model,
        tokenizer,
        config,
        output_dir,
        parameters,
        step,
        tokens_seen,
        last_val_loss,
        metrics,
        repo_id=args.hub_model_id if args.push_to_hub else None,
    )
    if args.push_to_hub and is_main:
        push_to_hub(output_dir, args.hub_model_id, private=args.hub_private, token=args.hub_token, step=step)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir


# ----------------------------------------------------------------------------------------------------
# Export: final model, tokenizer, generation config, training curve, model card, Hub


def generation_config_for(tokenizer, generation: dict):
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=bool(generation["do_sample"]),
        temperature=float(generation["temperature"]),
        top_k=int(generation["top_k"]),
        max_new_tokens=int(generation["max_new_tokens"]),
    )


def sample_generations(folder: Path, tokenizer, generation: dict, seed: int, device) -> list[dict]:
    """Generate from the *saved* model (so the samples also prove the folder loads)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    samples = []
    for index, prompt in enumerate(generation["prompts"]):
        torch.manual_seed(seed + index)
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        with torch.no_grad():
            output = model.generate(**inputs)
        text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        samples.append({"prompt": prompt, "completion": text})
    return samples


def write_model_card(folder: Path, config: dict, context: dict, repo_id: str | None = None) -> Path:
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    card = config["card"]
    eval_results = None
    if context.get("val_loss") is not None:
        eval_results = [
            EvalResult(
                task_type="text-generation",
                task_name="Causal language modeling",
                dataset_type=card.get("eval_dataset_type", "held-out-pretraining-split"),
                dataset_name="held-out validation split of the pretraining mix",
                dataset_split="validation",
                metric_type="perplexity",
                metric_name="Validation perplexity",
                metric_value=round(math.exp(context["val_loss"]), 4),
            )
        ]
    card_data = ModelCardData(
        language=card["language"],
        license=card["license"],
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys([*card["tags"], config["model_type"]])),
        datasets=card["datasets"] or None,
        model_name=repo_id or folder.name,
        eval_results=eval_results,
    )
    kwargs = {
        "repo_id": repo_id or str(folder),
        "model_name": repo_id.split("/")[-1] if repo_id else folder.name,
        "description": config["description"],
        **context,
    }
    if MODEL_CARD_TEMPLATE.is_file():
        model_card = ModelCard.from_template(card_data, template_path=str(MODEL_CARD_TEMPLATE), **kwargs)
    else:  # an installed package without the repository's model_cards/ folder
        model_card = ModelCard.from_template(card_data, model_id=repo_id or folder.name, **kwargs)
    path = folder / "README.md"
    model_card.save(str(path))
    return path


def export_final_model(
    accelerator, model, tokenizer, config, output_dir, parameters, step, tokens_seen, val_loss, metrics, repo_id=None
) -> None:
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP / DeepSpeed shards (collective)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.generation_config = generation_config_for(tokenizer, config["generation"])
    unwrapped.save_pretrained(
        str(output_dir),
        is_main_process=accelerator.is_main_process,
        state_dict=state_dict,
        save_function=accelerator.save,
    )
    if not accelerator.is_main_process:
        return
    tokenizer.save_pretrained(str(output_dir))
    records = metrics.read()
    curve = plot_training_curve(records, output_dir / "training_curve.png", f"{config['model_type']} pretraining")
    samples = sample_generations(
        output_dir, tokenizer, config["generation"], int(config["training"]["seed"]), accelerator.device
    )
    (output_dir / "samples.json").write_text(json.dumps(samples, indent=2) + "\n", encoding="utf-8")
    training = config["training"]
    context = {
        "model_type": config["model_type"],
        "model_fields": config["model"],
        "parameters": parameters,
        "steps": step,
        "tokens_seen": tokens_seen,
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss) if val_loss is not None else None,
        "training": training,
        "processes": accelerator.num_processes,
        "distributed_type": getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type)),
        "data_sources": config["data"].get("sources", []),
        "block_size": config["data"].get("block_size"),
        "training_curve": curve.name if curve else None,
        "samples": samples,
        "generation": config["generation"],
        "vocab_size": len(tokenizer),
        "train_records": len([r for r in records if r.get("type") == "train"]),
    }
    write_model_card(output_dir, config, context, repo_id=repo_id)
    log(f"saved the final model, tokenizer, generation config, samples and model card to {output_dir}")


def push_to_hub(folder: Path, repo_id: str, private: bool = False, token: str | None = None, step: int = 0):
    """create_repo + upload_folder through huggingface_hub.HfApi (checkpoints stay local)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(
        repo_id=repo.repo_id,
        folder_path=str(folder),
        repo_type="model",
        commit_message=f"amformers pretraining: step {step}",
        ignore_patterns=HUB_IGNORE_PATTERNS,
    )
    log(f"pushed {folder} to https://huggingface.co/{repo.repo_id}")
    return repo.repo_id


# ----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m amformers.train.pretrain",
        description="Pretrain an amformers model (any registered family) with Accelerate.",
    )
    parser.add_argument("--config", required=True, help="pretraining YAML (see train/configs/)")
    parser.add_argument("--output_dir", default=None, help="default: runs/<config name>")
    parser.add_argument("--max_steps", type=int, default=None, help="overrides training.max_steps")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from the latest checkpoint in output_dir (or from the checkpoint folder given)",
    )
    parser.add_argument("--dry_run", action="store_true", help="build the model on the meta device, print its size")
    parser.add_argument("--data_root", default=None, help="overrides data.root")
    parser.add_argument("--cache_dir", default=None, help="datasets cache for the tokenized data (data.cache_dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id", default=None, help="namespace/name of the Hub repository")
    parser.add_argument("--hub_private", action="store_true")
    parser.add_argument("--hub_token", default=None, help="default: HF_TOKEN or the cached login")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    if args.output_dir is None:
        args.output_dir = str(Path("runs") / Path(args.config).stem)
    return args


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"training.max_steps={args.max_steps}")
    if args.data_root is not None:
        overrides.append(f"data.root={json.dumps(args.data_root)}")
    if args.cache_dir is not None:
        overrides.append(f"data.cache_dir={json.dumps(args.cache_dir)}")
    config = load_config(args.config, overrides)

    if args.dry_run:
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config["tokenizer"])
        model = build_model(build_model_config(config, tokenizer), config["attn_implementation"], device="meta")
        parameters = count_parameters(model)
        embedding = model.get_input_embeddings().weight.numel()
        print(f"model_type: {config['model_type']}")
        print(f"parameters: {parameters}")
        print(f"non-embedding parameters: {parameters - embedding}")
        return parameters
    return train(args, config)


if __name__ == "__main__":
    try:
        main()
    except CheckpointError as error:
        print(f"{LOG_PREFIX} error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
