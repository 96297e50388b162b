"""The MQAR section of the report: best accuracy over learning rates per cell, seed spread, the claim's pairs."""

from pathlib import Path

from amformers.eval.results import format_table

from .. import load_json, pyplot
from .sweep import RESULTS


def validation_section(results: Path = RESULTS) -> list[str]:
    """The harness check first: attention in zoology's Figure-2 setting must solve MQAR, or no MQAR number counts."""
    data = load_json(results / "harness_validation.json")
    if not data or not data["runs"]:
        return []
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    for ax, part in zip(axes, ("solve", "ablation")):
        for i, run in enumerate(r for r in data["runs"] if r["part"] == part):
            label = f"L={run['seq_len']} kv={run['kv_pairs']} V={run['config']['vocab_size']} "
            label += f"heads={run['config']['heads']} lr={run['lr']:.1e} epochs={run['config']['epochs']}"
            steps = [h["step"] for h in run["history"]]
            ax.plot(steps, [h["test_accuracy"] for h in run["history"]], marker="o", ms=3, color=f"C{i}", label=label)
        ax.axhline(0.99, color="grey", lw=0.6, ls="--")
        ax.set_xlabel("training step (batch 64)")
        ax.set_title(part, fontsize=8)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("MQAR test accuracy")
    fig.tight_layout()
    fig.savefig(results / "harness_validation.png", dpi=110)
    plt.close(fig)
    verdicts = [{k: v for k, v in row.items() if k != "seed"} for row in data["verdicts"]]
    ablation = [
        {"heads": r["config"]["heads"], "head_dim": r["d_model"] // r["config"]["heads"], "lr": r["lr"],
         "d_model": r["d_model"], "seq_len": r["seq_len"], "kv_pairs": r["kv_pairs"],
         "vocab_size": r["config"]["vocab_size"], "best_test_accuracy": r["best_test_accuracy"], "steps": r["steps"],
         "cpu_seconds": r["cpu_seconds"]}
        for r in data["runs"] if r["part"] == "ablation"
    ]  # fmt: skip
    validated = ", ".join(f"{task} {'solved' if ok else 'NOT solved'}" for task, ok in data["validated_tasks"].items())
    lines = [
        "## MQAR harness validation",
        "",
        f"{data['question']} {validated}. Model: {data['model']}. Training: {data['training']}. Differences from "
        f"zoology: {data['zoology_differences']}. {len(data['runs'])} runs, {data['cpu_seconds_total']:.0f} CPU "
        f"seconds in all ({data['machine']}); commands: "
        + "; ".join(f"`{c}`" for c in data["run_commands"])
        + ". Curves: `experiments/mqar/results/harness_validation.png`.",
        "",
        format_table(verdicts, floatfmt=".3g"),
        "",
    ]
    if ablation:
        lines += [
            "At the first grid's budget (1,000 steps, the cosine schedule reaching 0 at the last one), (128, 8): its "
            "attention layout (d_model / 16 heads of width 16) and its first lr (3e-3), each against zoology's one "
            "head and lr 1e-3 (the solve runs above trained 8 epochs or more; their curves show the step where they "
            "left the plateau):",
            "",
            format_table(ablation, floatfmt=".3g"),
            "",
        ]
    return lines


def section(results: Path = RESULTS) -> list[str]:
    return validation_section(results) + grid_section(results)


def grid_section(results: Path = RESULTS) -> list[str]:
    data = load_json(results / "mqar.json")
    if not data or not data["best_over_lr"]:
        return []
    columns = (
        "family", "d_model", "seq_len", "kv_pairs", "seed", "state_size", "best_test_accuracy", "lr", "lrs_tried",
    )  # fmt: skip
    rows = [{k: r.get(k) for k in (*columns, "steps", "seconds")} for r in data["best_over_lr"]]
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    tasks = sorted({(r["seq_len"], r["kv_pairs"]) for r in rows})
    markers = "osD^v<>"
    for i, family in enumerate(sorted({r["family"] for r in rows})):
        for j, task in enumerate(tasks):
            mine = [r for r in rows if r["family"] == family and (r["seq_len"], r["kv_pairs"]) == task]
            label = family if j == 0 else None
            style = {"color": f"C{i}", "marker": markers[j % len(markers)], "label": label}
            left.scatter([r["state_size"] for r in mine], [r["best_test_accuracy"] for r in mine], **style)
            right.scatter([r["seconds"] for r in mine], [r["best_test_accuracy"] for r in mine], **style)
    left.set_xscale("log")
    left.set_xlabel("recurrent state size (numbers per sequence)")
    right.set_xscale("log")
    right.set_xlabel("training wall time (s)")
    left.set_ylabel("MQAR accuracy (best lr)")
    left.set_title("markers: " + ", ".join(f"{m} L={a} kv={b}" for m, (a, b) in zip(markers, tasks)), fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / "mqar.png", dpi=110)
    plt.close(fig)
    config = data.get("config") or {}
    lines = [
        "## MQAR",
        "",
        f"{data['runs']} runs, best test accuracy over learning rates per cell; "
        + (", ".join(f"{k} {v}" for k, v in config.items()) + "; " if config else "")
        + "".join(
            f"vocab_size {'/'.join(map(str, sizes))} at seq_len {length}; "
            for length, sizes in (data.get("vocab_size_by_seq_len") or {}).items()
            if "vocab_size" not in config
        )
        + f"command: `{data.get('sweep_command', data['command'])}`. Plot: `experiments/mqar/results/mqar.png`.",
        "",
        format_table(rows, floatfmt=".3f"),
        "",
    ]
    old_layout = [r for r in data["best_over_lr"] if r["family"] in ("attention", "attn_values")
                  and "heads" not in (r.get("config") or {})]  # fmt: skip
    if old_layout:
        lines += [
            f"{len(old_layout)} attention rows above were trained before the harness validation, with d_model / 16 "
            "heads of width 16 and the 1,000-step budget, at which attention stays on its plateau whatever the layout "
            "(see the validation section); the sweep now builds them with one head of width d_model. Rerun those "
            "cells at a longer budget before reading them.",
            "",
        ]
    spread = data.get("seed_spread") or []
    if spread:
        lines += [
            "Cells run with more than one seed (best accuracy over learning rates per seed; sample std):",
            "",
            format_table(spread, floatfmt=".3f"),
            "",
        ]
    comparisons = data.get("claim_comparisons") or []
    if comparisons:
        lines += [
            f"Claim: {data['claim']}. Metaplastic model minus its peer, same task and seed "
            "(a metaplastic state holds two numbers per entry, so at equal state size its peer is twice as wide):",
            "",
            format_table(comparisons, floatfmt=".3f"),
            "",
        ]
    return lines
