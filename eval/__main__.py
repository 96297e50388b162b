"""`python -m amformers.eval <suite> --model DIR`: evaluate a saved model directory, print a table, write JSON.

Suites: ioi, blimp, babi, perplexity, lm-eval, precision (bf16 vs fp32), generate, all.
Results go to <--results-dir, default ./eval_results>/<--name, default the model folder's name>/<suite>.json in the
schema of amformers.eval.results. Data (TinyStories, BLiMP, bAbI, pd-stories) come from --data-dir, else
$AMFORMERS_DATA_DIR, else ../shared/data (amformers.corpus.data_dir). Long suites draw a progress bar with an ETA
on stderr when it is a terminal (`--quiet` turns it off).

`python -m amformers.eval tasks-path` prints the installed folder of the amformers lm-eval tasks, for the lm-eval
command line from any working directory:

    lm-eval run --model hf --model_args pretrained=DIR,trust_remote_code=True \\
        --include_path "$(python -m amformers.eval tasks-path)" --tasks amformers --device cpu
"""

import argparse
import importlib
import os
import shlex
import sys
from importlib.resources import files
from pathlib import Path

from ..corpus import DATA_DIR_ENV
from ..model_folder import ModelFolderError, require_model_folder
from .common import QUIET_ENV
from .results import DEFAULT_RESULTS_DIR

# suite: (module, its run function, its option function, help). Modules are imported after --data-dir is applied:
# some read the data folder when imported.
SUITES = {
    "ioi": ("ioi", "main", "add_arguments", "IOI accuracy, P(IO) and logit difference"),
    "blimp": ("blimp", "main", "add_arguments", "BLiMP minimal pairs, overall and per phenomenon"),
    "babi": ("babi", "main", "add_arguments", "bAbI QA tasks 1-20, zero-shot answer ranking"),
    "perplexity": ("perplexity", "main", "add_arguments", "perplexity and bits per byte"),
    "lm-eval": ("harness", "main", "add_arguments", "the eval/tasks lm-eval tasks through HFLM"),
    "precision": ("sanity", "main_precision", "add_precision_arguments", "bf16 against fp32"),
    "generate": ("sanity", "main_generate", "add_generate_arguments", "greedy and sampled generations"),
}


# A copy-pasteable example per suite, shown by `python -m amformers.eval <suite> --help`.
EXAMPLES = {
    "ioi": "python -m amformers.eval ioi --model checkpoints/attn_stream-8m --limit 20",
    "blimp": "python -m amformers.eval blimp --model checkpoints/attn_stream-8m --limit 10 --batch-size 64",
    "babi": "python -m amformers.eval babi --model checkpoints/attn_stream-8m --limit 20",
    "perplexity": "python -m amformers.eval perplexity --model checkpoints/attn_stream-8m --limit 20",
    "lm-eval": "python -m amformers.eval lm-eval --model checkpoints/attn_stream-8m --tasks amformers_ioi --limit 20",
    "precision": "python -m amformers.eval precision --model checkpoints/attn_stream-8m",
    "generate": "python -m amformers.eval generate --model checkpoints/attn_stream-8m --max-new-tokens 32",
    "all": "python -m amformers.eval all --model checkpoints/attn_stream-8m --limit 10",
    "tasks-path": (
        "lm-eval run --model hf --model_args pretrained=checkpoints/attn_stream-8m,trust_remote_code=True \\\n"
        '    --include_path "$(python -m amformers.eval tasks-path)" --tasks amformers --limit 20 --device cpu'
    ),
}
TASKS_PATH_HELP = "print the folder of the installed amformers lm-eval tasks (for lm-eval --include_path)"


def _epilog(*commands: str) -> str:
    return ("examples:\n" if len(commands) > 1 else "example:\n") + "\n".join(f"  {command}" for command in commands)


def tasks_path() -> Path:
    """The installed `amformers/eval/tasks` folder (the lm-eval task YAMLs, their loader and data)."""
    folder = Path(str(files("amformers.eval").joinpath("tasks"))).resolve()
    if not (folder / "amformers_ioi.yaml").is_file():
        raise FileNotFoundError(
            f"{folder} holds no amformers lm-eval tasks: the package is installed without its data "
            "(reinstall with `pip install -e .` or from a wheel)."
        )
    return folder


def _suite(name: str):
    """(run, add_arguments) of a suite."""
    module_name, run, add, _ = SUITES[name]
    module = importlib.import_module(f"{__package__}.{module_name}")
    return getattr(module, run), getattr(module, add)


def apply_data_dir(argv: list[str]) -> None:
    """Make a `--data-dir` on the command line the data folder of this process (and of lm-eval's task loaders)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--data-dir")
    known, _ = pre.parse_known_args(argv)
    if known.data_dir:
        if not os.path.isdir(os.path.expanduser(known.data_dir)):
            raise SystemExit(f"error: --data-dir {known.data_dir} is not a folder.")
        os.environ[DATA_DIR_ENV] = known.data_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m amformers.eval",
        description="Evaluate a saved model folder: print a table per suite and write its results as JSON.",
        epilog=_epilog(EXAMPLES["ioi"], EXAMPLES["all"], "python -m amformers.eval tasks-path"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="suite", required=True, metavar="{suite,tasks-path}")
    for name, help_text in {**{k: v[3] for k, v in SUITES.items()}, "all": "every suite in turn"}.items():
        sub = commands.add_parser(
            name,
            help=help_text,
            description=f"python -m amformers.eval {name}: {help_text}.",
            epilog=_epilog(EXAMPLES[name]),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("--model", required=True, help="a saved model directory (config.json, weights, tokenizer)")
        sub.add_argument("--limit", type=int, help="examples per task / paradigm / set (default: all)")
        sub.add_argument("--batch-size", type=int, default=16)
        sub.add_argument(
            "--results-dir", default=str(DEFAULT_RESULTS_DIR), help="write <name>/<suite>.json here (./eval_results)"
        )
        sub.add_argument("--name", help="results sub-folder (default: the model directory's name)")
        sub.add_argument("--data-dir", help=f"data folder (default: ${DATA_DIR_ENV}, else ../shared/data)")
        sub.add_argument("--trust-remote-code", action="store_true", help="load through the directory's code")
        sub.add_argument(
            "--quiet", action="store_true", help="no progress bars of ours (only on a terminal; TQDM_DISABLE=1: none)"
        )
        adders = [_suite(name)[1]] if name in SUITES else list(dict.fromkeys(_suite(s)[1] for s in SUITES))
        for add in adders:
            add(sub)
    commands.add_parser(
        "tasks-path",
        help=TASKS_PATH_HELP,
        description=f"python -m amformers.eval tasks-path: {TASKS_PATH_HELP}; nothing else goes to stdout.",
        epilog=_epilog(EXAMPLES["tasks-path"]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    apply_data_dir(argv)
    args = build_parser().parse_args(argv)
    if args.suite == "tasks-path":
        try:
            print(tasks_path())
        except FileNotFoundError as error:
            raise SystemExit(f"error: {error}") from None
        return {}
    if args.quiet:
        os.environ[QUIET_ENV] = "1"  # our bars read it at run time (TQDM_DISABLE=1 before the command: every bar)
    args.command = shlex.join(["python", "-m", "amformers.eval", *argv])
    require_model_folder(args.model)  # before any suite reads its data
    names = list(SUITES) if args.suite == "all" else [args.suite]
    return {name: _suite(name)[0](args) for name in names}


if __name__ == "__main__":
    try:
        main()
    except ModelFolderError as error:  # a wrong --model path: one line, no traceback
        sys.exit(f"error: {error}")
