"""The lab: research reproductions, sweeps and the evaluation report. Not part of the installed package.

Run from the repository root (`python -m experiments.<experiment>.<runner>`); each experiment folder holds its
model/data code, its runner, its results (`results/`) and its report section (`report.py`). Experiments use the
library (`amformers.*`); the library never imports them. Training runs go to `runs/` in the checkout.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNS_ROOT = REPO_ROOT / "runs"


def load_json(path: Path):
    """The JSON in `path`, None when the file is not there (an experiment that has not run)."""
    import json

    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
