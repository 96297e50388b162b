"""`python -m amformers.eval <suite> --model DIR`: evaluate a saved model directory, print a table, write JSON.

Suites: ioi, blimp, babi, perplexity, lm-eval, precision (bf16 vs fp32), generate, all.
Results go to <--results-dir, default ./eval_results>/<--name, default the model folder's name>/<suite>.json in the
schema of amformers.eval.results. Data (TinyStories, BLiMP, bAbI, pd-stories) come from --data-dir, else
$AMFORMERS_DATA_DIR, else ../shared/data (amformers.corpus.data_dir).
"""

import argparse
import importlib
import os
import shlex
import sys

from ..corpus import DATA_DIR_ENV
from ..model_folder import ModelFolderError, require_model_folder
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
    parser = argparse.ArgumentParser(prog="python -m amformers.eval", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="suite", required=True)
    for name, help_text in {**{k: v[3] for k, v in SUITES.items()}, "all": "every suite in turn"}.items():
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--model", required=True, help="a saved model directory (config.json, weights, tokenizer)")
        sub.add_argument("--limit", type=int, help="examples per task / paradigm / set (default: all)")
        sub.add_argument("--batch-size", type=int, default=16)
        sub.add_argument(
            "--results-dir", default=str(DEFAULT_RESULTS_DIR), help="write <name>/<suite>.json here (./eval_results)"
        )
        sub.add_argument("--name", help="results sub-folder (default: the model directory's name)")
        sub.add_argument("--data-dir", help=f"data folder (default: ${DATA_DIR_ENV}, else ../shared/data)")
        sub.add_argument("--trust-remote-code", action="store_true", help="load through the directory's code")
        adders = [_suite(name)[1]] if name in SUITES else list(dict.fromkeys(_suite(s)[1] for s in SUITES))
        for add in adders:
            add(sub)
    return parser


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    apply_data_dir(argv)
    args = build_parser().parse_args(argv)
    args.command = shlex.join(["python", "-m", "amformers.eval", *argv])
    require_model_folder(args.model)  # before any suite reads its data
    names = list(SUITES) if args.suite == "all" else [args.suite]
    return {name: _suite(name)[0](args) for name in names}


if __name__ == "__main__":
    try:
        main()
    except ModelFolderError as error:  # a wrong --model path: one line, no traceback
        sys.exit(f"error: {error}")
