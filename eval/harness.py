"""The amformers lm-eval tasks (eval/tasks/*.yaml) run through lm-eval's Python API (HFLM).

The same tasks run from the lm-eval CLI on any saved model directory (the directory carries our remote code):

    lm-eval run --model hf --model_args pretrained=DIR,trust_remote_code=True \\
        --include_path eval/tasks --tasks amformers_ioi amformers_tinystories_cloze amformers_blimp

Tasks: amformers_ioi (acc = IOI accuracy), amformers_blimp (acc over all 67 paradigms),
amformers_tinystories_cloze (last-word cloze: acc and perplexity). `--limit` caps examples per task.
"""

import os
import time
from pathlib import Path

from .common import DATA_ROOT, format_table, load_model, results_path, write_results

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DEFAULT_TASKS = ["amformers_ioi", "amformers_tinystories_cloze", "amformers_blimp"]


def available_tasks(tasks: list[str]) -> list[str]:
    """Drop amformers_blimp when the BLiMP data is absent (so the suite skips it cleanly)."""
    blimp = Path(os.environ.get("AMFORMERS_BLIMP_DIR", DATA_ROOT / "blimp"))  # as tasks/task_data.py
    if "amformers_blimp" in tasks and not any(blimp.glob("*.jsonl")):
        print(f"BLiMP data not found in {blimp}: skipping amformers_blimp.")
        return [t for t in tasks if t != "amformers_blimp"]
    return tasks


def run_tasks(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8) -> dict:
    """lm-eval's `simple_evaluate` on an in-memory model; returns {task: {metric: value}}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        backend="causal",
        batch_size=batch_size,
        max_length=int(getattr(model.config, "max_position_embeddings", 2048)),
    )
    output = simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(TASKS_DIR)),
        limit=limit,
        num_fewshot=0,
        log_samples=False,
        bootstrap_iters=0,
    )
    return {
        task: {k: v for k, v in metrics.items() if k != "alias" and not isinstance(v, str)}
        for task, metrics in output["results"].items()
    }


def main(args) -> dict:
    started = time.time()
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
    tasks = available_tasks(args.tasks or DEFAULT_TASKS)
    results = run_tasks(model, tokenizer, tasks, args.limit, args.batch_size)
    rows = [{"task": t, **{k.replace(",none", ""): v for k, v in m.items()}} for t, m in results.items()]
    print(format_table(rows))
    config = {"tasks": tasks, "limit": args.limit, "include_path": str(TASKS_DIR), "lm_eval": _lm_eval_version()}
    path = results_path(args.model, "lm-eval", args.results_dir, args.name)
    write_results(
        path, "lm-eval", args.model, {"config": config, "results": results}, model, started, command=args.command
    )
    print(f"wrote {path}")
    return results


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


def add_arguments(parser):
    parser.add_argument("--tasks", nargs="*", help=f"lm-eval task names (default: {' '.join(DEFAULT_TASKS)})")
