"""Dataset loaders for the amformers lm-eval tasks (referenced from the YAML files as `custom_dataset`).

lm-eval resolves a YAML's relative `data_files` against the current working directory, so a task shipped with
its data would only run from one folder. Instead each YAML names one of these functions; lm-eval imports this
file by its path, and the functions find the data relative to this file, whatever the working directory.
Standard library + `datasets` (and `amformers.corpus` when it imports): the lm-eval CLI process need not have
amformers.

- IOI and the TinyStories cloze read `data/*.jsonl` next to this file (written by
  `python -m amformers.eval.build_tasks`).
- BLiMP reads the 67 paradigm files from `$AMFORMERS_BLIMP_DIR`, else `blimp/` in the data folder of
  `amformers.corpus.data_dir()` (`$AMFORMERS_DATA_DIR`, else `../shared/data` from the current directory; the
  rule is restated here for a process that cannot import amformers). From another working directory set
  AMFORMERS_DATA_DIR, or leave amformers_blimp out of `--tasks`; `python -m amformers.eval --data-dir` sets it.
"""

import json
import os
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"  # the task data shipped beside this file (package data)


def blimp_dir() -> Path:
    """$AMFORMERS_BLIMP_DIR, else <amformers.corpus.data_dir()>/blimp."""
    if os.environ.get("AMFORMERS_BLIMP_DIR"):
        return Path(os.environ["AMFORMERS_BLIMP_DIR"]).expanduser()
    try:
        from amformers.corpus import data_dir
    except ImportError:  # the same rule without the package
        return Path(os.environ.get("AMFORMERS_DATA_DIR") or Path("..") / "shared" / "data").expanduser() / "blimp"
    return data_dir() / "blimp"


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
    folder = blimp_dir()
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(
            f"No BLiMP *.jsonl files in {folder.resolve()} (working directory {Path.cwd()}): set AMFORMERS_DATA_DIR "
            "to the data folder that holds blimp/ (or AMFORMERS_BLIMP_DIR to the BLiMP folder itself), or run "
            "without amformers_blimp: --tasks amformers_ioi amformers_tinystories_cloze"
        )
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
