"""The Reddy-2023 section of the report: steps to 95% per variant, unfinished runs, and the accuracy curves."""

from pathlib import Path

from amformers.eval.results import format_table

from .. import load_json, pyplot
from .run import RESULTS

ICL_SETS = ("test", "ic", "ic2", "iw")


def section(results: Path = RESULTS) -> list[str]:
    data = load_json(results / "icl_reddy.json")
    if not data:
        return []
    lines = ["## Reddy-2023 in-context classification (two-layer attention-only network)", ""]
    if not data["variants"]:
        lines += ["No run has finished yet.", ""]
    rows = []
    for variant, entry in data["variants"].items():
        row = {"variant": variant, "seeds": len(entry["seeds"])}
        for s in ICL_SETS:
            summary = entry["summary"][s]
            row[f"{s}: steps to 95%"] = (
                f"{summary['mean']:.0f} ± {summary['std']:.0f} ({summary['reached']})"
                if summary["mean"]
                else f"not reached ({summary['reached']})"
            )
        speed = entry.get("speedup_vs_baseline", {}).get("ic")
        row["ic: fewer steps than baseline"] = f"{speed:+.0%}" if speed is not None else ""
        learned = [r["history"][-1].get("stream_weights") for r in data["runs"] if r["variant"] == variant]
        learned = [w for w in learned if w]
        row["final (w_own, w_src), mean over seeds"] = (
            "({:.2f}, {:.2f})".format(*(sum(w[i] for w in learned) / len(learned) for i in range(2))) if learned else ""
        )
        rows.append(row)
    if rows:
        c = data["runs"][0]["config"]
        lines += [
            f"Steps to 95% accuracy, mean ± std over the seeds that reached it (reached/seeds); test sets of "
            f"{c['test_size']} sequences evaluated every {c['eval_every']} iterations; runs stop when "
            f"{' and '.join(c.get('stop_sets', ICL_SETS))} reach 95% or after {c['iterations']} iterations. "
            f"The claim tested: {data['claim']}.",
            "",
            format_table(rows),
            "",
        ]
    if data.get("unfinished_runs"):
        rows = [
            {"unfinished run": u["run"], "step": u["step"], **{k: u.get("last_eval", {}).get(k) for k in ICL_SETS}}
            for u in data["unfinished_runs"]
        ]
        lines += [
            "Unfinished runs (not in the table above), accuracy at their last evaluation:",
            "",
            format_table(rows),
            "",
        ]
    if data["runs"]:
        plt = pyplot()
        fig, axes = plt.subplots(1, 4, figsize=(14, 3.2), sharey=True)
        colours = {}
        for run in data["runs"]:
            colour = colours.setdefault(run["variant"], f"C{len(colours)}")
            steps = [h["step"] for h in run["history"]]
            for ax, s in zip(axes, ICL_SETS):
                ax.plot(steps, [h[s] for h in run["history"]], color=colour, alpha=0.7, label=run["variant"])
        for ax, s in zip(axes, ICL_SETS):
            ax.set_title(s)
            ax.axhline(0.95, color="grey", lw=0.5)
            ax.set_xlabel("iteration")
        axes[0].set_ylabel("accuracy")
        handles = {h.get_label(): h for h in axes[0].get_lines() if not h.get_label().startswith("_")}
        axes[-1].legend(handles.values(), handles.keys(), fontsize=7)
        fig.tight_layout()
        fig.savefig(results / "icl_reddy.png", dpi=110)
        plt.close(fig)
        lines += ["Accuracy curves: `experiments/icl_reddy/results/icl_reddy.png`.", ""]
    return lines
