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
    config, accelerator, tokenizer, parameters, step, tokens_seen, val_loss, samples, records, curve=None
) -> dict:
    """What the model card shows about a finished run (see `amformers.model_card.write_model_card`)."""
    training = config["training"]
    return {
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
    curve = plot_training_curve(records, output_dir / "training_curve.png", f"{config['model_type']} pretraining")
    samples = sample_generations(
        output_dir, tokenizer, config["generation"], int(config["training"]["seed"]), accelerator.device
    )
    (output_dir / "samples.json").write_text(json.dumps(samples, indent=2) + "\n", encoding="utf-8")
    context = card_context(
        config, accelerator, tokenizer, parameters, step, tokens_seen, val_loss, samples=samples, records=records,
        curve=curve,
    )  # fmt: skip
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
