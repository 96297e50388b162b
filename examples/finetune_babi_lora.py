"""Fine-tune a shipped checkpoint with PEFT LoRA on bAbI task 1 using `transformers.Trainer`, and report the
test accuracy before and after.

    python examples/finetune_babi_lora.py --model checkpoints/palimpsa-8m

This is the downstream use a released model is meant for: the base weights stay frozen, a LoRA adapter
(r=8 on every linear layer but the LM head) learns the task from the 10,000 training questions of
`qa1_single-supporting-fact_train.txt`, and the model is scored on the 1,000 test questions before and after.
Prompts and scoring are those of the zero-shot bAbI suite (`amformers.eval.babi`):

    "<statements before the question>\\nQuestion: <question>\\nAnswer:"   ->   " <answer>"

with the answer chosen as the highest-likelihood one among the task's candidate answers (6 rooms for task 1,
so chance is 1/6). Training uses the same token sequence, BOS + prompt + answer + EOS, with the loss on the
answer and EOS tokens only. The adapter is saved to `--output-dir` (default runs/babi_lora/<model name>) and the
numbers to `--results` (default ./eval_results/<model name>/babi_lora.json, in the amformers.eval.results schema).

bAbI's training split is used here only to fine-tune a copy of the model for this example; the pretraining
data never contains bAbI, so the zero-shot bAbI suite stays zero-shot.
"""

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

from amformers.eval.babi import PROMPT, default_dir, evaluate_task, parse_task, prompt_for, task_files
from amformers.eval.common import encode_pair, load_model, model_summary, prefix_token_id, run_command
from amformers.eval.results import provenance, result_path, write_result
from amformers.model_folder import ModelFolderError

DEFAULT_BLOCK_SIZE = 256  # the block size every 8M config is pretrained with (train/configs/*-8m.yaml)


def block_size(config, override: int | None = None) -> int:
    """Longest training sequence: `override`, else the model's position limit if it has one (AttnStream), else the
    block size the 8M checkpoints were pretrained with (Palimpsa is recurrent and has no limit of its own)."""
    limit = getattr(config, "max_position_embeddings", None)
    if override is not None and limit is not None and override > limit:
        raise ValueError(f"--max-length {override} exceeds the model's max_position_embeddings ({limit}).")
    return int(override or limit or DEFAULT_BLOCK_SIZE)


def task_split_files(data_dir: str | Path, task: int) -> tuple[Path, Path]:
    """(train file, test file) of bAbI task `task`, or a clear error naming what is missing."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"bAbI folder {data_dir} does not exist: pass --data with the folder holding qaN_*_train.txt / "
            "qaN_*_test.txt (the project expects bAbI en-10k in ../shared/data/babi/en-10k beside the checkout)."
        )
    test = task_files(data_dir).get(task)
    if test is None:
        raise FileNotFoundError(f"No test file for bAbI task {task} (qa{task}_*_test.txt) in {data_dir}.")
    train = test.with_name(test.name.removesuffix("_test.txt") + "_train.txt")
    if not train.is_file():
        raise FileNotFoundError(f"No training file {train.name} beside {test.name} in {data_dir}.")
    return train, test


def training_example(tokenizer, question: dict, max_length: int) -> dict:
    """BOS + prompt + " answer" + EOS, labels only on the answer and EOS, cut from the left to `max_length`.

    The prompt/answer split is the one the scorer uses (`encode_pair`), so training sees exactly the tokens that
    are scored. Cutting from the left drops the oldest story statements and keeps the question and answer.
    """
    context_ids, answer_ids = encode_pair(tokenizer, prompt_for(question), " " + question["answer"])
    target_ids = answer_ids + [tokenizer.eos_token_id]
    if len(target_ids) >= max_length:
        raise ValueError(f"Answer {question['answer']!r} ({len(answer_ids)} tokens) does not fit {max_length}.")
    input_ids = ([prefix_token_id(tokenizer)] + context_ids + target_ids)[-max_length:]
    labels = [-100] * (len(input_ids) - len(target_ids)) + target_ids
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", required=True, help="saved model folder (config.json, weights, tokenizer)")
    parser.add_argument("--task", type=int, default=1, help="bAbI task number (default 1: single supporting fact)")
    parser.add_argument(
        "--data", help="folder with the bAbI en-10k qaN_*_{train,test}.txt (default: <data dir>/babi/en-10k)"
    )
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (linear decay, 5%% warmup)")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument(
        "--target-modules", nargs="+", default=["all-linear"], help="LoRA targets (default: every linear but lm_head)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--eval-batch-size", type=int, default=32, help="sequences per scoring forward pass")
    parser.add_argument("--limit-train", type=int, help="use only the first N training questions (default: all)")
    parser.add_argument("--limit-test", type=int, help="score only the first N test questions (default: all)")
    parser.add_argument(
        "--max-length",
        type=int,
        help="cut training sequences (from the left) to N tokens "
        f"(default: max_position_embeddings, else {DEFAULT_BLOCK_SIZE})",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", help="where the adapter is saved (default: runs/babi_lora/<model name>)")
    parser.add_argument("--results", help="results JSON (default: eval_results/<model name>/babi_lora.json)")
    parser.add_argument("--trust-remote-code", action="store_true", help="load a folder without the package installed")
    args = parser.parse_args(argv)
    for name in ("epochs", "lr", "lora_r", "batch_size", "eval_batch_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")
    for name in ("limit_train", "limit_test", "max_length"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")
    return args


def main(argv=None) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    args = parse_args(argv)
    command = run_command() if argv is None else shlex.join(["python", "examples/finetune_babi_lora.py", *argv])
    started = time.time()
    train_file, test_file = task_split_files(args.data or default_dir(), args.task)
    train_questions = parse_task(train_file)[: args.limit_train]
    all_test_questions = parse_task(test_file)
    candidates = sorted({q["answer"] for q in all_test_questions})  # from the whole file, as the zero-shot suite
    test_questions = all_test_questions[: args.limit_test]

    set_seed(args.seed)
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"The tokenizer in {args.model} has no EOS token to end the training answers with.")
    if tokenizer.pad_token_id is None:  # padding is masked out of attention and loss, so any id will do
        tokenizer.pad_token = tokenizer.eos_token
    max_length = block_size(model.config, args.max_length)
    base_summary = model_summary(model)
    model_name = Path(args.model).resolve().name
    print(f"{model_name}: {base_summary['model_type']}, {base_summary['num_parameters']:,} parameters")
    print(
        f"bAbI task {args.task}: {len(train_questions)} train / {len(test_questions)} test questions, "
        f"{len(candidates)} candidate answers, sequences cut to {max_length} tokens"
    )

    t0 = time.time()
    before = evaluate_task(model, tokenizer, test_questions, candidates, args.eval_batch_size)
    eval_seconds = time.time() - t0
    print(f"accuracy before: {before['accuracy']:.4f} (chance {before['chance']:.4f}, {eval_seconds:.0f} s)")

    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules,
    )
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    adapted_modules = sorted(model.peft_config["default"].target_modules)

    train_examples = [training_example(tokenizer, q, max_length) for q in train_questions]
    output_dir = Path(args.output_dir) if args.output_dir else Path("runs") / "babi_lora" / model_name
    steps_per_epoch = -(-len(train_examples) // args.batch_size)
    training_args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0.05,
        weight_decay=0.0,
        train_sampling_strategy="group_by_length",  # similar lengths per batch: far less padding on a CPU
        logging_steps=max(1, round(steps_per_epoch * args.epochs / 20)),
        save_strategy="no",
        report_to="none",
        label_names=["labels"],
        seed=args.seed,
        bf16=False,
        fp16=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_examples,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    t0 = time.time()
    train_output = trainer.train()
    train_seconds = time.time() - t0
    model.save_pretrained(output_dir)  # the adapter alone (adapter_model.safetensors + adapter_config.json)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    print(
        f"trained {train_output.global_step} steps in {train_seconds:.0f} s; loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    )

    model.eval()
    t0 = time.time()
    after = evaluate_task(model, tokenizer, test_questions, candidates, args.eval_batch_size)
    eval_seconds_after = time.time() - t0
    print(f"accuracy after:  {after['accuracy']:.4f} (chance {after['chance']:.4f})")

    settings = {
        "task": args.task,
        "train_file": str(train_file.resolve()),
        "test_file": str(test_file.resolve()),
        "num_train": len(train_questions),
        "num_test": len(test_questions),
        "max_length": max_length,
        "prompt": PROMPT,
        "candidates": candidates,
        "num_candidates": before["num_candidates"],
        "lora": {
            "r": args.lora_r,
            "lora_alpha": args.lora_alpha,
            "lora_dropout": args.lora_dropout,
            "target_modules": adapted_modules,
        },
        "epochs": args.epochs,
        "learning_rate": args.lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    training = {
        "steps": train_output.global_step,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_seconds": round(train_seconds, 2),
        "seconds_per_train_example": round(train_seconds / (len(train_examples) * args.epochs), 4),
        "eval_seconds_before": round(eval_seconds, 2),
        "eval_seconds_after": round(eval_seconds_after, 2),
        "train_loss_first": losses[0],
        "train_loss_last": losses[-1],
        "train_loss_mean": statistics.fmean(losses),
    }
    metrics = {
        "parameters": base_summary["num_parameters"],
        "babi_lora_accuracy_before": before["accuracy"],
        "babi_lora_accuracy_after": after["accuracy"],
        "babi_lora_chance": before["chance"],
    }
    path = Path(args.results) if args.results else result_path(model_name, "babi_lora")
    write_result(
        path, model=model_name, suite="babi_lora", command=command, settings=settings, metrics=metrics,
        tables={"training": [training]},
        provenance=provenance(args.model, started, base_summary, adapter_dir=str(output_dir.resolve()),
                              device=str(training_args.device)),
    )  # fmt: skip
    print(f"wrote {path}")
    return {**settings, **training, **metrics}


if __name__ == "__main__":
    try:
        main()
    except ModelFolderError as error:  # a wrong --model path: one line, no traceback
        sys.exit(f"error: {error}")
