"""The pretraining loop, on Accelerate: one function, `train`, and the three things it does every step.

    run:  checkpoint check -> Accelerator -> tokenizer, data, model, optimizer, schedule -> resume
    step: micro-batches -> forward/backward (token-exact) -> clip -> AdamW -> schedule -> log, evaluate, save
    end:  summary -> final validation -> export (model, tokenizer, samples, card) -> Hub

What the loop guarantees:
- token-exact loss under gradient accumulation and data parallelism: each micro-batch's summed cross-entropy is
  divided by the number of target tokens of the whole optimizer step on all processes (`num_items_in_batch`),
  so N processes x 1 micro-batch == 1 process x N micro-batches;
- deterministic data order given the seed: blocks are shuffled by (seed, epoch) only, and a resumed run skips
  exactly the micro-batches already consumed, so a run killed with `kill -9` and resumed with --resume logs the
  same losses as an uninterrupted run (checkpoints: `amformers.train.checkpoints`).

The next-token rule (position t predicts token t + 1) is the model's: its loss shifts the labels. The loop only
counts the targets that rule leaves, through `next_token_targets`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import yaml

from .checkpoints import resolve_resume, restore, run_identity, save_checkpoint, trainer_state
from .config import (
    build_model,
    build_model_config,
    build_optimizer,
    build_scheduler,
    compile_model,
    count_parameters,
)
from .data import DataConfig, build_datasets, build_loaders, dataset_summary, micro_batches
from .export import export_final_model, push_to_hub
from .metrics import LOG_PREFIX, MetricsLog, Throughput, TrainRecords, log
from .tokenizer import load_tokenizer

IGNORE_INDEX = -100  # a label the loss skips (transformers' convention)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """The labels the model's causal-LM loss scores: position t predicts labels[t + 1], so the first label of
    each row is never a target. `IGNORE_INDEX` entries are skipped by the loss."""
    return labels[..., 1:]


def accumulate_gradients(accelerator, model, batches: list[dict]) -> tuple[torch.Tensor, float]:
    """Forward and backward over this process's micro-batches of one optimizer step, token-exactly.

    Each micro-batch's loss is its summed cross-entropy divided by the target tokens of the *whole* step
    on all processes (`num_items_in_batch`), so the gradients add up to those of the mean loss over every
    token of the step, however the tokens are split into micro-batches and processes. Returns this
    process's share of that mean loss (sum over processes = the step's loss) and the forward+backward time.
    """
    accumulation, world = accelerator.gradient_accumulation_steps, accelerator.num_processes
    targets = sum((next_token_targets(b["labels"]) != IGNORE_INDEX).sum() for b in batches)
    items = accelerator.reduce(targets, reduction="sum")
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

    Each block is scored by the model's own loss (summed over its targets), so training and validation share one
    loss. `max_batches` counts batches over all processes together (the prepared loader deals batches to the
    processes in turn), so N processes score the same blocks as one.
    """
    if loader is None:
        return None
    if max_batches:
        max_batches = -(-max_batches // accelerator.num_processes)
    loss_function = accelerator.unwrap_model(model).loss_function
    summed = torch.ones((), dtype=torch.long, device=accelerator.device)  # num_items_in_batch=1: the summed loss
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    total_tokens = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for index, batch in enumerate(loader):
        if max_batches and index >= max_batches:
            break
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        labels = batch["labels"]
        vocab_size = logits.shape[-1]
        losses = [loss_function(row[None], labels[i : i + 1], vocab_size, summed) for i, row in enumerate(logits)]
        targets = (next_token_targets(labels) != IGNORE_INDEX).sum(1)
        per_sample = torch.stack([torch.stack(losses).double(), targets.double()], dim=1)
        per_sample = accelerator.gather_for_metrics(per_sample)  # drops the blocks repeated to even the batches
        total_loss += per_sample[:, 0].sum()
        total_tokens += per_sample[:, 1].sum()
    model.train()
    return float(total_loss / total_tokens) if total_tokens > 0 else None


def optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm: float):
    """Clip (if `max_grad_norm` > 0), step AdamW and the schedule, clear the gradients; the norm before clipping."""
    grad_norm = None
    if max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        grad_norm = grad_norm.detach() if torch.is_tensor(grad_norm) else grad_norm
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def make_accelerator(training: dict, cpu: bool = False):
    """The Accelerator of a run: accumulation handled by `accumulate_gradients`, the schedule stepped once per
    optimizer step. Refuses a launch where each process would set up a run of its own."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    accelerator = Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=int(training["gradient_accumulation_steps"]), sync_with_dataloader=False
        ),
        mixed_precision=training["mixed_precision"],
        step_scheduler_with_optimizer=False,
        cpu=cpu,
    )
    launched, world = int(os.environ.get("WORLD_SIZE", "1")), accelerator.num_processes
    if launched != world:  # e.g. an FSDP config launched on a machine without GPUs: N copies of one run
        raise RuntimeError(
            f"{launched} processes were launched but Accelerate set up {world} ({accelerator.distributed_type}); "
            "they would overwrite each other's files. On CPU-only machines launch with `accelerate launch "
            "--multi_gpu --num_processes N ... --cpu` (DDP over gloo); FSDP and DeepSpeed need GPUs."
        )
    return accelerator


def train(args, config: dict) -> Path:
    """Pretrain the config's model into `args.output_dir` (resuming per `args.resume`); the output folder."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    training = config["training"]
    output_dir = Path(args.output_dir)
    # Refuse a bad checkpoint before any heavy work. Only the first process reads every byte to check the
    # SHA-256 sums; the others check the sizes (a failing process stops the whole launch).
    resume_from = resolve_resume(
        args.resume, output_dir / "checkpoints", check_hashes=os.environ.get("RANK", "0") == "0"
    )
    accelerator = make_accelerator(training, cpu=args.cpu)
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    seed, accumulation = int(training["seed"]), int(training["gradient_accumulation_steps"])
    set_seed(seed)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    # Tokenizer, data, model, optimizer, schedule.
    tokenizer = load_tokenizer(config["tokenizer"])
    model_config = build_model_config(config, tokenizer)
    data_config = DataConfig.from_dict(config["data"])
    with accelerator.main_process_first():
        train_blocks, valid_blocks = build_datasets(data_config, tokenizer, seed)
    model = build_model(model_config, config["attn_implementation"])
    if training["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if training["compile"]:
        why_not = compile_model(model, accelerator.device)
        if is_main:
            log(
                "model compiled with torch.compile"
                if why_not is None
                else f"torch.compile unavailable ({why_not}); training eagerly"
            )
    parameters = count_parameters(model)
    if is_main:
        log(f"data: train {dataset_summary(train_blocks)}, validation {dataset_summary(valid_blocks)}")
        log(f"model: {config['model_type']}, parameters: {parameters}, processes: {world}")
    optimizer = build_optimizer(model, training)
    scheduler = build_scheduler(optimizer, training)
    batch_size = int(training["batch_size"])
    train_loader, sampler, valid_loader = build_loaders(
        train_blocks, valid_blocks, batch_size, seed, training["eval_batch_size"], int(training["num_workers"])
    )
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    valid_loader = accelerator.prepare(valid_loader) if valid_loader is not None else None
    if len(train_loader) == 0:
        raise ValueError(
            f"{len(train_blocks)} training blocks cannot fill one batch of {batch_size} on each of {world} "
            "processes: add data, or lower training.batch_size or data.block_size."
        )

    # Resume, or start afresh.
    identity = run_identity(config, model_config, data_config.block_size, world * accumulation)
    metrics = MetricsLog(output_dir / "metrics.jsonl", enabled=is_main)
    step, tokens_seen = 0, 0
    if resume_from is not None:
        step, tokens_seen = restore(accelerator, resume_from, identity)
        metrics.truncate_after(step)
        if is_main:
            log(f"resumed from {resume_from} at step {step}")
    elif is_main:
        metrics.path.unlink(missing_ok=True)

    max_steps, log_every = int(training["max_steps"]), int(training["log_every"])
    eval_every, save_every = int(training["eval_every"]), int(training["save_every"])
    eval_batches, max_grad_norm = int(training["eval_batches"]), float(training["max_grad_norm"] or 0.0)
    tokens_per_step = world * accumulation * batch_size * data_config.block_size
    stream = micro_batches(accelerator, train_loader, sampler, step * accumulation)
    records, throughput = TrainRecords(accelerator, metrics, tokens_per_step), Throughput()
    progress = tqdm(total=max_steps, initial=step, disable=not is_main, desc="pretrain", dynamic_ncols=True)
    val_loss, eval_step = None, None
    model.train()
    while step < max_steps:
        start = time.perf_counter()
        batches = [next(stream) for _ in range(accumulation)]
        data_seconds = time.perf_counter() - start
        step_loss, forward_backward = accumulate_gradients(accelerator, model, batches)
        update_start = time.perf_counter()
        grad_norm = optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm)
        update_seconds = time.perf_counter() - update_start
        step += 1
        tokens_seen += tokens_per_step
        records.add(step, step_loss, grad_norm, scheduler.get_last_lr()[0], time.perf_counter() - start)
        progress.update(1)
        saving = save_every > 0 and (step % save_every == 0 or step == max_steps)
        if step % log_every == 0 or step == max_steps or saving:
            last = records.flush()
            if last is not None:
                lr, speed = f"{last['lr']:.2e}", f"{last['tokens_per_second'] or 0:.0f}"
                progress.set_postfix(loss=f"{last['loss']:.4f}", lr=lr, tok_s=speed)
        throughput.add(time.perf_counter() - start, forward_backward, data_seconds, update_seconds)
        if eval_every > 0 and valid_loader is not None and (step % eval_every == 0 or step == max_steps):
            val_loss, eval_step = evaluate(accelerator, model, valid_loader, eval_batches), step
            metrics.write_eval(step, val_loss)
            if is_main and val_loss is not None:
                progress.write(f"{LOG_PREFIX} step {step}: validation loss {val_loss:.4f}")
        if saving:
            state = trainer_state(step, tokens_seen, identity)
            save_checkpoint(accelerator, output_dir / "checkpoints", step, state, int(training["save_total_limit"]))
    records.flush()
    progress.close()

    summary = throughput.summary(step, parameters, world, tokens_per_step)
    metrics.write([summary])
    if is_main and throughput.steps:
        log(
            f"throughput: {summary['tokens_per_second']:.0f} tokens/s over {throughput.steps} steps; "
            f"{100 * summary['overhead_fraction']:.1f}% of step time outside forward/backward"
        )
    if valid_loader is not None and eval_step != step:  # e.g. evaluation off, or resumed at max_steps
        val_loss = evaluate(accelerator, model, valid_loader, eval_batches)
        metrics.write_eval(step, val_loss)
    repo_id = args.hub_model_id if args.push_to_hub else None
    export_final_model(
        accelerator, model, tokenizer, config, output_dir, parameters, step, tokens_seen, val_loss, metrics, repo_id
    )
    if repo_id and is_main:
        push_to_hub(output_dir, repo_id, private=args.hub_private, token=args.hub_token, step=step)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir
