"""Dataset loaders for the amformers lm-eval tasks (referenced from the YAML files as `custom_dataset`).

lm-eval resolves a YAML's relative `data_files` against the current working directory, so a task shipped with
its data would only run from one folder. Instead each YAML names one of these functions; lm-eval imports this
file by its path, and the functions find the data relative to this file, whatever the working directory.
Standard library + `datasets` only: the lm-eval CLI process need not import amformers.

- IOI and the TinyStories cloze read `data/*.jsonl` next to this file (written by
  `python -m amformers.eval.build_tasks`).
- BLiMP reads the 67 paradigm files from `$AMFORMERS_BLIMP_DIR`, else `../shared/data/blimp/` relative to the
  project root.
"""

import json
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE / "data"
BLIMP_DIR = HERE.parents[1].parent / "shared" / "data" / "blimp"


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: build it with `python -m amformers.eval.build_tasks`.")
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _as_dataset(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_ioi(**_metadata):
    return _as_dataset(_read_jsonl(DATA_DIR / "ioi.jsonl"))


def load_cloze(**_metadata):
    return _as_dataset(_read_jsonl(DATA_DIR / "tinystories_cloze.jsonl"))


def load_blimp(**_metadata):
    folder = Path(os.environ.get("AMFORMERS_BLIMP_DIR", BLIMP_DIR))
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"No BLiMP *.jsonl files in {folder} (set AMFORMERS_BLIMP_DIR).")
    rows = []
    for path in files:
        for record in _read_jsonl(path):
            rows.append(
                {
                    "sentence_good": record["sentence_good"],
                    "sentence_bad": record["sentence_bad"],
                    "UID": record.get("UID", path.stem),
                    "field": record.get("field", ""),
                }
            )
    return _as_dataset(rows)
