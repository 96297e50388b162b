"""The README's first command: load each shipped checkpoint, generate a story, print the evaluation table.

    make demo        (or: python examples/quickstart.py [--prompt "..."] [--max-new-tokens 80])

Every model loads through `AutoModelForCausalLM.from_pretrained` from `checkpoints/<name>/`, exactly as a user loads
it from a folder or the Hub. The table is read from each checkpoint's `eval_results.json` and
`training_summary.json`, written by `python -m amformers.model_card --results experiments/model_eval/results
--checkpoints checkpoints/` and `python -m amformers.train.ship` from the JSON results of the evaluation suite.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import amformers  # noqa: F401  (registers the model families with the Auto classes)
from amformers.eval.results import format_table

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
ORDER = ("attn_stream-8m", "attn_stream-baseline-8m", "palimpsa-8m", "notpalimpsa-8m")
COLUMNS = (  # (key in eval_results.json, header, format)
    ("tinystories_valid_perplexity", "TinyStories ppl", "{:.2f}"),
    ("heldout_books_bits_per_byte", "books bits/byte", "{:.3f}"),
    ("ioi_accuracy", "IOI acc", "{:.3f}"),
    ("ioi_mean_logit_diff", "IOI logit diff", "{:+.3f}"),
    ("blimp_accuracy", "BLiMP acc", "{:.3f}"),
    ("babi_mean_accuracy", "bAbI acc (0-shot)", "{:.3f}"),
    ("babi_lora_accuracy_after", "bAbI task 1 acc after LoRA", "{:.3f}"),
)


def shipped_checkpoints() -> list[Path]:
    folders = {p.parent.name: p.parent for p in CHECKPOINTS.glob("*/config.json")}
    ordered = [folders.pop(name) for name in ORDER if name in folders] + [folders[k] for k in sorted(folders)]
    if not ordered:
        raise SystemExit(f"no checkpoints found in {CHECKPOINTS} (each is a folder with a config.json)")
    return ordered


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def table_row(folder: Path) -> dict:
    results, summary = read_json(folder / "eval_results.json"), read_json(folder / "training_summary.json")
    row = {
        "model": folder.name,
        "tokens": f"{summary['tokens'] / 1e6:.2f}M" if "tokens" in summary else "",
        "train h": f"{summary['train_seconds'] / 3600:.2f}" if "train_seconds" in summary else "",
    }
    for key, header, fmt in COLUMNS:
        value = results.get(key)
        row[header] = fmt.format(value) if isinstance(value, (int, float)) else ""
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="Once upon a time, a little girl named Lily")
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows = []
    for folder in shipped_checkpoints():
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        inputs = tokenizer(args.prompt, return_tensors="pt")
        torch.manual_seed(args.seed)
        with torch.no_grad():  # sampling with the checkpoint's generation_config.json (temperature, top-k)
            output = model.generate(**inputs, max_new_tokens=args.max_new_tokens)
        story = tokenizer.decode(output[0], skip_special_tokens=True)
        parameters = sum(p.numel() for p in model.parameters())
        seconds = time.perf_counter() - start
        print(f"== {folder.name}: {type(model).__name__}, {parameters:,} parameters, {seconds:.1f} s")
        print(story.strip(), end="\n\n")
        rows.append(table_row(folder))
    print(
        "Evaluation (eval_results.json of each checkpoint; how each number was made: "
        "experiments/model_eval/results/<name>/):\n"
    )
    headers = [h for h in rows[0] if any(row[h] for row in rows)]  # drop suites no checkpoint has run
    print(format_table([{h: row[h] for h in headers} for row in rows]))


if __name__ == "__main__":
    main()
