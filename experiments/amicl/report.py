"""The AMICL section of the report: the notebook table against ours, and the accuracy plot."""

from pathlib import Path

from amformers.eval.results import format_table

from .. import load_json
from .run import RESULTS, plot


def section(results: Path = RESULTS) -> list[str]:
    data = load_json(results / "amicl.json")
    if not data:
        return []
    rows = [
        {
            "D": r["D"], "K": r["K"], "T": r["T"], "a": f"{r['a']:g}", "notebook": r["notebook_correct"],
            "ours (mean ± std over seeds)": f"{r['correct_mean']:.1f} ± {r['correct_std']:.1f}",
            "diff (pp)": f"{r['difference_pp']:+.1f}", "within ±3 pp": "yes" if r["within_3pp"] else "no",
        }
        for r in data["table"]
    ]  # fmt: skip
    plot(data, results / "amicl.png")
    return [
        "## AMICL associative memory (no training)",
        "",
        f"Correct trials out of {data['config']['trials']}, {data['config']['seeds']} seeds; "
        f"command: `{data['command'].strip()}`. Plot: `experiments/amicl/results/amicl.png`.",
        "",
        format_table(rows),
        "",
    ]
