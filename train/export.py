"""The end of a pretraining run: the final model folder, its samples and training curve, the model card, the Hub.

`export_final_model` gathers the (possibly sharded) weights and saves, into the run folder: the model
(`save_pretrained`, with its generation config), the tokenizer, `training_curve.png` (from `metrics.jsonl`),
`samples.json` (generated from the *saved* folder, which proves it loads) and `README.md` (rendered by
`amformers.model_card`). `push_to_hub` uploads that folder, checkpoints left out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..model_card import write_model_card
from .metrics import log

HUB_IGNORE_PATTERNS = ["checkpoints/*", ".*", "**/.*"]


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


def card_context(
    config: dict,
    *,
    parameters: int,
    steps: int,
    tokens_seen: int,
    val_loss: float | None,
    samples: list[dict],
    generation: dict,
    vocab_size: int,
    processes: int = 1,
    distributed_type: str | None = None,
    curve: str | None = None,
    summary: dict | None = None,
) -> dict:
    """What the model card shows about a finished run (see `amformers.model_card.write_model_card`).

    `generation` is the saved generation config (what `generate()` does by default); `summary` the shipped
    `training_summary.json` (training time, hardware note), when there is one.
    """
    return {
        "model_type": config["model_type"],
        "model_fields": config["model"],
        "parameters": parameters,
        "steps": steps,
        "tokens_seen": tokens_seen,
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss) if val_loss is not None else None,
        "training": config["training"],
        "processes": processes,
        "distributed_type": distributed_type,
        "data_sources": config["data"].get("sources", []),
        "block_size": config["data"].get("block_size"),
        "training_curve": curve,
        "samples": samples,
        "generation": generation,
        "vocab_size": vocab_size,
        "train_hours": round(summary["train_seconds"] / 3600, 2) if summary and summary.get("train_seconds") else None,
        "training_note": (summary or {}).get("note"),
    }


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def saved_parameters(folder: Path) -> int:
    """The parameter count of the model saved in `folder` (config.json built on the meta device, as the pretraining
    command counts it: a tied embedding once, buffers not at all)."""
    from transformers import AutoConfig

    import amformers  # noqa: F401  (registers the model types)

    from .config import build_model, count_parameters

    return count_parameters(build_model(AutoConfig.from_pretrained(str(folder)), device="meta"))


def folder_card_context(folder: str | Path, **known) -> tuple[dict, dict]:
    """(config, card context) of a saved run or shipped checkpoint, read from its files: `train_config.yaml`,
    `metrics.jsonl`, `samples.json`, `generation_config.json`, the tokenizer, the weights and, when present,
    `training_summary.json` and `training_curve.png`. `known` overrides what the folder cannot tell (the number
    of processes and the distributed type of the run that is exporting itself, or its exact counts)."""
    import yaml

    folder = Path(folder)
    missing = [
        name
        for name in ("train_config.yaml", "metrics.jsonl", "samples.json", "generation_config.json", "tokenizer.json")
        if not (folder / name).is_file()
    ]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: not a finished pretraining run folder.")
    from tokenizers import Tokenizer

    config = yaml.safe_load((folder / "train_config.yaml").read_text(encoding="utf-8"))
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval" and r.get("val_loss") is not None]
    if not train:
        raise ValueError(f"{folder}/metrics.jsonl logs no training step.")
    summary = _read_json(folder / "training_summary.json")
    steps, tokens = train[-1]["step"], train[-1]["tokens"]
    training, block_size = config["training"], config["data"]["block_size"]
    per_process = int(training["batch_size"]) * int(training["gradient_accumulation_steps"]) * int(block_size)
    generation = _read_json(folder / "generation_config.json")
    fields = {
        "steps": steps,
        "tokens_seen": tokens,
        "val_loss": max(evals, key=lambda r: r["step"])["val_loss"] if evals else None,
        "samples": _read_json(folder / "samples.json"),
        "generation": {key: generation.get(key) for key in ("do_sample", "temperature", "top_k", "max_new_tokens")},
        "vocab_size": Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(),
        "processes": max(1, tokens // steps // per_process),
        "curve": "training_curve.png" if (folder / "training_curve.png").is_file() else None,
        "summary": summary,
        **known,
    }
    if fields.get("parameters") is None:
        fields["parameters"] = saved_parameters(folder)
    context = card_context(config, **fields)
    return config, context


def write_folder_card(folder: str | Path, repo_id: str | None = None, **known) -> Path:
    """Render `folder/README.md` from the folder's own files (the card the pretraining export writes, and what
    `python -m amformers.model_card --render FOLDER` rewrites for a shipped checkpoint)."""
    config, context = folder_card_context(folder, **known)
    return write_model_card(folder, config, context, repo_id=repo_id)


def export_final_model(
    accelerator, model, tokenizer, config, output_dir, parameters, step, tokens_seen, val_loss, metrics, repo_id=None
) -> None:
    """Save the final model (all processes take part in gathering the weights), then, on the main process, the
    tokenizer, training curve, samples and model card."""
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
    plot_training_curve(records, output_dir / "training_curve.png", f"{config['model_type']} pretraining")
    samples = sample_generations(
        output_dir, tokenizer, config["generation"], int(config["training"]["seed"]), accelerator.device
    )
    (output_dir / "samples.json").write_text(json.dumps(samples, indent=2) + "\n", encoding="utf-8")
    distributed_type = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    write_folder_card(
        output_dir, repo_id=repo_id, parameters=parameters, steps=step, tokens_seen=tokens_seen, val_loss=val_loss,
        processes=accelerator.num_processes, distributed_type=distributed_type,
    )  # fmt: skip
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
