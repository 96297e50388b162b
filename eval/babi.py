"""bAbI QA (Weston et al. 2015), zero-shot: answer accuracy on the test set of each of the 20 tasks.

Reads `qaN_*_test.txt` from `<data dir>/babi/en-10k/` (amformers.corpus.data_dir) or `--babi-data`. A question's
context is every statement of its story before it (questions are left out), then the question:

    "<statement> <statement> ...\\nQuestion: <question>\\nAnswer:"

and the answer is scored as the continuation " <answer>". The model's answer is the candidate with the
highest summed log-probability among every distinct answer of that task's test file (e.g. the 6 locations of
task 1, yes/no/maybe for tasks 6 and 10), so accuracy is a ranking accuracy with a per-task chance level of
1/#candidates, which we report next to it. bAbI is never pretraining data; only the LoRA example
(examples/finetune_babi_lora.py) trains on it, on the train split, and scores the test split.
"""

import re
import statistics
import time
from collections import defaultdict
from pathlib import Path

from ..corpus import data_dir
from .common import load_model, save_result, score_continuations
from .results import format_table

PROMPT = "{story}\nQuestion: {question}\nAnswer:"


def default_dir() -> Path:
    """bAbI en-10k in the data folder."""
    return data_dir() / "babi" / "en-10k"


def task_files(folder: str | Path) -> dict[int, Path]:
    """{task number: test file}, for the files present."""
    files = {}
    for path in Path(folder).glob("qa*_test.txt"):
        match = re.match(r"qa(\d+)_", path.name)
        if match:
            files[int(match.group(1))] = path
    return dict(sorted(files.items()))


def parse_task(path: str | Path) -> list[dict]:
    """Questions of one bAbI file, each with the statements of its story that precede it."""
    questions, story = [], []
    for line_number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        index, _, text = line.partition(" ")
        if not index.isdigit():
            raise ValueError(f"{path}:{line_number}: expected 'ID text', got {line!r}.")
        if int(index) == 1:
            story = []
        if "\t" in text:
            fields = text.split("\t")
            if len(fields) < 2:
                raise ValueError(f"{path}:{line_number}: a question line needs 'question<TAB>answer'.")
            questions.append({"story": list(story), "question": fields[0].strip(), "answer": fields[1].strip()})
        else:
            story.append(text.strip())
    return questions


def prompt_for(question: dict) -> str:
    return PROMPT.format(story=" ".join(question["story"]), question=question["question"])


def evaluate_task(
    model, tokenizer, questions: list[dict], candidates: list[str], batch_size: int = 16, desc: str | None = None
) -> dict:
    pairs = [(prompt_for(q), " " + c) for q in questions for c in candidates]
    scores = score_continuations(model, tokenizer, pairs, batch_size=batch_size, desc=desc)
    correct = []
    for i, q in enumerate(questions):
        row = scores[i * len(candidates) : (i + 1) * len(candidates)]
        best = max(range(len(candidates)), key=lambda j: row[j].logprob)
        correct.append(candidates[best] == q["answer"])
    return {
        "n": len(questions),
        "accuracy": statistics.fmean(correct),
        "num_candidates": len(candidates),
        "chance": 1 / len(candidates),
    }


def evaluate(model, tokenizer, folder, limit: int | None = None, tasks=None, batch_size=16) -> dict:
    per_task = {}
    chosen = {number: path for number, path in task_files(folder).items() if not tasks or number in tasks}
    for index, path in enumerate(chosen.values(), 1):
        questions = parse_task(path)
        candidates = sorted({q["answer"] for q in questions})  # from the whole file, before the limit
        name = path.name.removesuffix("_test.txt")
        per_task[name] = evaluate_task(
            model, tokenizer, questions[:limit] if limit else questions, candidates, batch_size,
            desc=f"babi {name.split('_')[0]} ({index}/{len(chosen)})",
        )  # fmt: skip
    by_number = defaultdict(list)
    for result in per_task.values():
        by_number["accuracy"].append(result["accuracy"])
        by_number["chance"].append(result["chance"])
    return {
        "mean_accuracy": statistics.fmean(by_number["accuracy"]) if per_task else float("nan"),
        "mean_chance": statistics.fmean(by_number["chance"]) if per_task else float("nan"),
        "per_task": per_task,
    }


def main(args) -> dict | None:
    started = time.time()
    folder = args.babi_data or default_dir()
    if not task_files(folder):
        print(f"bAbI test files not found in {folder}: skipping.")
        return None
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
    result = evaluate(model, tokenizer, folder, args.limit, args.babi_tasks, args.batch_size)
    rows = [{"task": k, **v} for k, v in result["per_task"].items()]
    rows.append({"task": "MEAN", "accuracy": result["mean_accuracy"], "chance": result["mean_chance"]})
    print(format_table(rows, ["task", "n", "accuracy", "chance", "num_candidates"]))
    settings = {"data": str(Path(folder).resolve()), "limit_per_task": args.limit, "prompt": PROMPT}
    metrics = {"babi_mean_accuracy": result["mean_accuracy"], "babi_mean_chance": result["mean_chance"]}
    tables = {"tasks": [{"task": k, **v} for k, v in result["per_task"].items()]}
    save_result(args, "babi", settings=settings, metrics=metrics, tables=tables, model=model, started=started)
    return result


def add_arguments(parser):
    parser.add_argument("--babi-data", help="folder with the qaN_*_test.txt files (default: <data dir>/babi/en-10k)")
    parser.add_argument("--babi-tasks", type=int, nargs="*", help="task numbers (default: all 20)")
