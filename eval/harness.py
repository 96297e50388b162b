"""The amformers lm-eval tasks (eval/tasks/*.yaml) run through lm-eval's Python API (HFLM).

The same tasks run from the lm-eval CLI on any saved model directory (the directory carries our remote code), from
any working directory (`python -m amformers.eval tasks-path` prints the installed task folder):

    lm-eval run --model hf --model_args pretrained=DIR,trust_remote_code=True \\
        --include_path "$(python -m amformers.eval tasks-path)" --tasks amformers --device cpu

`--tasks amformers` (the tag) includes amformers_blimp, which reads BLiMP from the data folder: set
AMFORMERS_DATA_DIR when running elsewhere than beside `../shared/data`, or name the other two tasks.

Tasks: amformers_ioi (acc = IOI accuracy), amformers_blimp (acc over all 67 paradigms),
amformers_tinystories_cloze (last-word cloze: acc and perplexity). `--limit` caps examples per task.
"""

import time
from importlib.resources import as_file, files

from .common import load_model, save_result
from .results import METRICS, format_table, lm_eval_metric_name
from .tasks.task_data import blimp_dir

DEFAULT_TASKS = ["amformers_ioi", "amformers_tinystories_cloze", "amformers_blimp"]


def available_tasks(tasks: list[str]) -> list[str]:
    """Drop amformers_blimp when the BLiMP data is absent (so the suite skips it cleanly)."""
    blimp = blimp_dir()
    if "amformers_blimp" in tasks and not any(blimp.glob("*.jsonl")):
        print(f"BLiMP data not found in {blimp}: skipping amformers_blimp.")
        return [t for t in tasks if t != "amformers_blimp"]
    return tasks


def tasks_dir():
    """The folder of the task YAMLs, package data of amformers.eval (a context manager giving a real path)."""
    return as_file(files("amformers.eval") / "tasks")


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
    with tasks_dir() as include_path:
        output = simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=TaskManager(include_path=str(include_path)),
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
    with tasks_dir() as include_path:
        settings = {
            "tasks": tasks,
            "limit": args.limit,
            "include_path": str(include_path),
            "lm_eval": _lm_eval_version(),
        }
    save_result(
        args, "lm-eval", settings=settings, metrics=headline_metrics(results), tables={"tasks": rows}, model=model,
        started=started,
    )  # fmt: skip
    return results


def headline_metrics(results: dict) -> dict:
    """The declared metrics among lm-eval's {task: {"metric,filter": value}} (stderr and counts stay in the table)."""
    metrics = {}
    for task, values in results.items():
        for metric, value in values.items():
            name = lm_eval_metric_name(task, metric)
            if name in METRICS and "," in metric:
                metrics[name] = value
    return metrics


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


def add_arguments(parser):
    parser.add_argument("--tasks", nargs="*", help=f"lm-eval task names (default: {' '.join(DEFAULT_TASKS)})")
