"""The pretraining config: its schema, defaults and validation, and what is built from it (model, optimizer,
learning-rate schedule).

A pretraining YAML has the top-level keys `TOP_LEVEL_KEYS`: `model_type` and `model` (the fields of the family's
transformers config class), `tokenizer`, `data` (checked by `amformers.train.data.DataConfig`), `training`
(`TRAINING_DEFAULTS`), `card` (`CARD_DEFAULTS`), `generation` (`GENERATION_DEFAULTS`), `description` and
`attn_implementation`. `load_config` reads one, applies `--set key.sub=value` overrides, refuses unknown keys
(naming the closest known one) and values of the wrong type, and fills the defaults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
from pathlib import Path

import torch
import yaml

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
    "compile": False,  # torch.compile the model (inductor); trains eagerly where this machine cannot compile
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


def compile_model(model, device: torch.device | str) -> str | None:
    """`torch.compile` the model in place (`nn.Module.compile`: parameter names, saving and resuming are unchanged).
    Returns None when compiled, else why not: a machine that cannot compile on `device` (no C++ compiler for inductor
    on a CPU, no Triton on a GPU) is found with a one-line probe before training and leaves the model eager."""
    try:
        probe = torch.compile(lambda x: torch.nn.functional.silu(x) * 2.0, fullgraph=True)
        probe(torch.ones(4, device=device))
    except Exception as error:  # any compiler failure means: train eagerly
        first_line = (str(error).strip().splitlines() or [""])[0]
        return f"{type(error).__name__}: {first_line}"[:300]
    model.compile(dynamic=False)  # the loop's batches keep one shape: no symbolic-shape graphs
    return None


def count_parameters(model) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return model.num_parameters()


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms, biases, gates and other vectors)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, training: dict) -> torch.optim.Optimizer:
    """AdamW from the `training` section, weight decay on matrices only."""
    return torch.optim.AdamW(
        parameter_groups(model, float(training["weight_decay"])),
        lr=float(training["learning_rate"]),
        betas=(float(training["adam_beta1"]), float(training["adam_beta2"])),
        eps=float(training["adam_epsilon"]),
        fused=bool(training["fused_adamw"]),  # one kernel per group: 3-10x faster than the per-tensor loop
    )


def build_scheduler(optimizer, training: dict):
    """Linear warmup, then cosine decay to `min_lr_ratio` x peak at `max_steps`."""
    from transformers import get_scheduler

    return get_scheduler(
        "cosine_with_min_lr",
        optimizer,
        num_warmup_steps=int(training["warmup_steps"]),
        num_training_steps=int(training["max_steps"]),
        scheduler_specific_kwargs={"min_lr_rate": float(training["min_lr_ratio"])},
    )
