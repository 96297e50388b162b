"""Build the data files of the lm-eval tasks in eval/tasks/data/ (deterministic; rerun after changing a builder).

    python -m amformers.eval.build_tasks      # from the repository root: writes eval/tasks/data/ of the checkout

- ioi.jsonl: the 8 official IOI prompts and Wang et al.'s 15 templates x {BABA, ABBA} with TinyStories names
  (10 fillings each), fields prompt / io / s / set / template / order.
- tinystories_cloze.jsonl: LAMBADA-style items from TinyStories valid.txt (held out from training): for every
  paragraph whose last word already occurs earlier in its story, context = the story up to that word and
  target = " word".
"""

import argparse
import json
import re
from pathlib import Path

from .ioi import official_prompts, wang_prompts
from .perplexity import TINYSTORIES_VALID, read_stories

SOURCE_TASK_DATA = Path("eval") / "tasks" / "data"  # in the checkout, relative to the repository root
_LAST_WORD = re.compile(r"^(?P<head>.*\S)\s+(?P<word>[A-Za-z]+)(?P<tail>[^A-Za-z\s]*)$", flags=re.DOTALL)


def cloze_items(stories: list[str], min_context_words: int = 20) -> list[dict]:
    items = []
    for story_index, story in enumerate(stories):
        paragraphs = story.split("\n")
        for p_index, paragraph in enumerate(paragraphs):
            match = _LAST_WORD.match(paragraph.strip())
            if not match:
                continue
            context = "\n".join(paragraphs[:p_index] + [match["head"]])
            word = match["word"]
            earlier = re.search(rf"\b{re.escape(word)}\b", context, flags=re.IGNORECASE)
            if earlier and len(context.split()) >= min_context_words:
                items.append({"story": story_index, "paragraph": p_index, "context": context, "target": " " + word})
    return items


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def build(out_dir: Path, tinystories: Path = TINYSTORIES_VALID) -> dict[str, int]:
    ioi = official_prompts() + wang_prompts("tinystories", per_template=10, seed=0)
    write_jsonl(out_dir / "ioi.jsonl", ioi)
    counts = {"ioi.jsonl": len(ioi)}
    if Path(tinystories).is_file():
        cloze = cloze_items(read_stories(tinystories))
        write_jsonl(out_dir / "tinystories_cloze.jsonl", cloze)
        counts["tinystories_cloze.jsonl"] = len(cloze)
    else:
        print(f"{tinystories} not found: the cloze task was not built.")
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=Path, default=SOURCE_TASK_DATA, help="default: eval/tasks/data (run from the root)"
    )
    parser.add_argument("--tinystories", type=Path, default=TINYSTORIES_VALID)
    args = parser.parse_args(argv)
    if not args.out.parent.is_dir():
        parser.error(f"{args.out.parent} does not exist: run from the repository root or pass --out.")
    for name, count in build(args.out, args.tinystories).items():
        print(f"{args.out / name}: {count} items")


if __name__ == "__main__":
    main()
