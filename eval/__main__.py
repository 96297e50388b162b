"""`python -m amformers.eval <suite> --model DIR`: evaluate a saved model directory, print a table, write JSON.

Suites: ioi, blimp, babi, perplexity, lm-eval, precision (bf16 vs fp32), generate, all.
Results go to eval/results/<model dir name>/<suite>.json (or --results-dir / --name).
"""

import argparse
import shlex
import sys

from ..model_folder import ModelFolderError, require_model_folder
from . import babi, blimp, harness, ioi, perplexity, sanity

SUITES = {
    "ioi": (ioi.main, ioi.add_arguments, "IOI accuracy, P(IO) and logit difference"),
    "blimp": (blimp.main, blimp.add_arguments, "BLiMP minimal pairs, overall and per phenomenon"),
    "babi": (babi.main, babi.add_arguments, "bAbI QA tasks 1-20, zero-shot answer ranking"),
    "perplexity": (perplexity.main, perplexity.add_arguments, "perplexity and bits per byte"),
    "lm-eval": (harness.main, harness.add_arguments, "the eval/tasks lm-eval tasks through HFLM"),
    "precision": (sanity.main_precision, sanity.add_precision_arguments, "bf16 against fp32"),
    "generate": (sanity.main_generate, sanity.add_generate_arguments, "greedy and sampled generations"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m amformers.eval", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="suite", required=True)
    for name, (_, add_arguments, help_text) in {**SUITES, "all": (None, None, "every suite in turn")}.items():
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--model", required=True, help="a saved model directory (config.json, weights, tokenizer)")
        sub.add_argument("--limit", type=int, help="examples per task / paradigm / set (default: all)")
        sub.add_argument("--batch-size", type=int, default=16)
        sub.add_argument("--results-dir", help="write <name>/<suite>.json here instead of eval/results/")
        sub.add_argument("--name", help="results sub-folder (default: the model directory's name)")
        sub.add_argument("--trust-remote-code", action="store_true", help="load through the directory's code")
        if add_arguments is not None:
            add_arguments(sub)
        else:  # "all" takes every suite's options
            for _, add, _ in SUITES.values():
                add(sub)
    return parser


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    args.command = shlex.join(["python", "-m", "amformers.eval", *argv])
    require_model_folder(args.model)  # before any suite reads its data
    if args.suite != "all":
        return {args.suite: SUITES[args.suite][0](args)}
    return {name: run(args) for name, (run, _, _) in SUITES.items()}


if __name__ == "__main__":
    try:
        main()
    except ModelFolderError as error:  # a wrong --model path: one line, no traceback
        sys.exit(f"error: {error}")
