"""MQAR sweep: 2-layer, no-MLP models of every family, accuracy against recurrent state size and wall time.

Families (a family whose model class is not installed is skipped with a message):
  attention        AttnStream with attention_stream="none" (Llama attention, RoPE)
  attn_values      AttnStream with value streams (Burns et al.)
  palimpsa         PalimpsaConfig(metaplastic=True)                 (Bonnet et al.)
  not_palimpsa     PalimpsaConfig(metaplastic=False)                (its non-metaplastic twin)
  meta_mamba2      PalimpsaConfig(mixer="mamba2", metaplastic=True)
  mamba2           PalimpsaConfig(mixer="mamba2", metaplastic=False) (Mamba2-like)
Every model has 2 layers and no MLP (zoology's Identity state mixer: AttnStream blocks' MLPs are replaced by zero,
Palimpsa models are built with intermediate_size=0),
d_model in {64, 128}. Attention families: one head as wide as d_model (zoology's Figure-2 layout). The first grid
(d/16 heads of width 16, 1,000 steps) left attention at chance; `python -m experiments.mqar.sweep validate` checks
that attention solves MQAR in this harness, and its ablation found that at 1,000 steps (cosine to 0) neither layout
nor lr 3e-3 / 1e-3 leaves the plateau at (128, 8), while one head on a 2,000-step cosine schedule (lr 2.15e-3)
reaches 0.997 after 1,000 of them: the schedule and budget bind first. Recurrent families: d/16 heads of key dim 16
and value dim 32 (the Palimpsa MQAR configs: expand_v 2; for the mamba2 mixer head_dim is the SSM state size, so
Mamba2 heads are 32 wide with state 16 and n_groups = heads).
Palimpsa-family layers start from the official MQAR harness's "small forgetting" init (`small_forgetting_init`).
Data: eval/mqar.py, power_a 0.01, train/test from disjoint seeds. Training: AdamW (weight decay 0.1), cosine
schedule to 0, batch 64, test accuracy after every epoch, early stop once it reaches 99%; the loss and logits are
computed at the asked positions only. The reported accuracy of a (family, d, seq_len, kv) cell is the best over
learning rates, as in zoology. Recurrent state per sequence: attention 2 * layers * seq_len * kv_heads * head_dim
(its KV cache); linear recurrences layers * heads * d_k * d_v, twice that for metaplastic models (mean and
importance states), unless the model reports `recurrent_state_size()` itself.

The default grid is sized for this 2-core CPU (about 10 CPU-hours, 5 hours for two processes; results/mqar.json
records what its runs took as `training_seconds_total`): 6 families x d_model {64, 128} x (seq_len, kv pairs) in
{(128, 16), (256, 32)} x lr {3e-3, 1e-3}, vocab max(256, 2 * seq_len), 16,000 training examples x 4 epochs (1,000
steps), 1,000 test examples. Zoology and the official Palimpsa sweep train 100,000 examples for 60-64 epochs with
vocab 8192 on a GPU; the flags reach that grid (add the tasks 128x32 and 256x64).

    python -m experiments.mqar.sweep run &        # resumable (runs/mqar/results.jsonl); start it twice to use
    python -m experiments.mqar.sweep run &        # two cores: the processes claim cells in runs/mqar/claims/
    python -m experiments.mqar.sweep summarise    # -> experiments/mqar/results/mqar.json
"""

import argparse
import itertools
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from amformers.eval.results import git_commit

from .. import RUNS_ROOT
from .task import mqar, split_seed

FAMILIES = ("attention", "attn_values", "palimpsa", "not_palimpsa", "meta_mamba2", "mamba2")
DEFAULT_TASKS = ((128, 16), (256, 32))  # the CPU grid; the GPU grid adds (128, 32) and (256, 64)
DEFAULT_LRS = (3e-3, 1e-3)  # in this order: a sweep stopped early has every family and width at 3e-3
RUNS_DIR = RUNS_ROOT / "mqar"
RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 256  # the CPU grid; zoology uses 8192
# Attention heads of the attention families: zoology's Figure-2 MHA has one head as wide as d_model. Our first grid
# used d_model / 16 heads of width 16 and stayed at chance (see results/harness_validation.json).
ATTENTION_HEADS = 1


def task_vocab(seq_len: int, vocab_size: int | None = None) -> int:
    """The vocabulary a task trains with: vocab_size when given, else the CPU grid's 256 widened to 2 * seq_len, since
    zoology's generator needs more tokens than positions (L=256 trains with 512)."""
    return vocab_size if vocab_size is not None else max(VOCAB, 2 * seq_len)


class NoMLP(nn.Module):
    """Zoology's Identity state mixer: the block adds nothing after its sequence mixer."""

    def forward(self, hidden_states):
        return torch.zeros_like(hidden_states)


def drop_mlps(model: nn.Module) -> nn.Module:
    for module in list(model.modules()):
        if isinstance(getattr(module, "mlp", None), nn.Module):
            module.mlp = NoMLP()
    return model


@torch.no_grad()
def small_forgetting_init(model: nn.Module) -> nn.Module:
    """The official MQAR harness's "small forgetting" initialisation of every Palimpsa / Meta-Mamba2 layer: decay
    rates A = linspace(0.01, 0.16) and time steps dt from 0.1 down to 0.001 (log-spaced) across heads, so that the
    slowest heads still remember the key-value pairs when their queries come (the language-model init, A ~ U(0, 16),
    forgets most of a 128-token context)."""
    for module in model.modules():
        if hasattr(module, "A_log") and hasattr(module, "dt_bias"):
            heads = module.A_log.numel()
            dt = torch.logspace(math.log10(0.1), math.log10(0.001), heads)
            module.A_log.copy_(torch.linspace(0.01, 0.16, heads).log())
            module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
    return model


def build_model(
    family: str, d_model: int, seq_len: int, vocab_size: int = VOCAB, heads: int | None = None,
    attention_dropout: float = 0.0, attn_implementation: str | None = None,
):  # fmt: skip
    """A 2-layer, MLP-free causal LM of `family`, or None when the family is not installed.

    Attention families default to zoology's layout, one head as wide as the model (`ATTENTION_HEADS`); the
    recurrent families to the official Palimpsa MQAR layout, heads of key dim 16 (d_model / 16 of them). `heads`
    overrides either; `attention_dropout` applies to the attention families only (zoology's MHA uses 0.1);
    `attn_implementation` (e.g. "amformers_triton" on a GPU) is set on the built model."""
    model = _build_model(family, d_model, seq_len, vocab_size, heads, attention_dropout)
    if model is not None and attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return model


def _build_model(family, d_model, seq_len, vocab_size, heads, attention_dropout):
    if family in ("attention", "attn_values"):
        from amformers import AttnStreamConfig, AttnStreamForCausalLM

        config = AttnStreamConfig(
            vocab_size=vocab_size, hidden_size=d_model, intermediate_size=4, num_hidden_layers=2,
            num_attention_heads=heads or ATTENTION_HEADS, max_position_embeddings=seq_len, bos_token_id=None,
            eos_token_id=None, attention_stream="none" if family == "attention" else "values",
            attention_dropout=attention_dropout,
        )  # fmt: skip
        return drop_mlps(AttnStreamForCausalLM(config))
    try:
        from amformers import PalimpsaConfig, PalimpsaForCausalLM
    except ImportError:
        return None
    heads = heads or max(1, d_model // 16)
    mamba = family in ("meta_mamba2", "mamba2")
    config = PalimpsaConfig(
        vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=2, num_heads=heads, head_dim=16, expand_v=2,
        intermediate_size=0, metaplastic=family in ("palimpsa", "meta_mamba2"), bos_token_id=None, eos_token_id=None,
        **({"mixer": "mamba2", "n_groups": heads} if mamba else {}),
    )  # fmt: skip
    return small_forgetting_init(drop_mlps(PalimpsaForCausalLM(config)))


def recurrent_state_size(model, family: str, seq_len: int) -> int:
    """Numbers a model keeps per sequence to continue decoding (see the module docstring)."""
    if hasattr(model, "recurrent_state_size"):
        return int(model.recurrent_state_size())
    c = model.config
    if family in ("attention", "attn_values"):
        return 2 * c.num_hidden_layers * seq_len * c.num_key_value_heads * c.head_dim
    d_k, d_v = c.head_dim, getattr(c, "value_dim", int(c.head_dim * getattr(c, "expand_v", 1)))
    return c.num_hidden_layers * c.num_heads * d_k * d_v * (2 if c.metaplastic else 1)


def asked_logits(model, inputs: torch.Tensor, labels: torch.Tensor):
    """Logits and labels at the asked positions only (the LM head on every position would cost 10x more)."""
    hidden = model.base_model(input_ids=inputs).last_hidden_state
    asked = labels != -100
    return model.lm_head(hidden[asked]), labels[asked]


@torch.no_grad()
def evaluate(model, inputs, labels, batch_size=256) -> float:
    """`mqar.accuracy` of the model, with the LM head applied at the asked positions only."""
    model.eval()
    scores = []
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i : i + batch_size], labels[i : i + batch_size]
        asked = y != -100
        predictions = torch.full_like(y, -1)
        predictions[asked] = model.lm_head(model.base_model(input_ids=x).last_hidden_state[asked]).argmax(-1)
        scores.append(((predictions == y) & asked).sum(-1).float() / asked.sum(-1).clamp(min=1))
    model.train()
    return float(torch.cat(scores).mean())


def train_one(
    family, d_model, seq_len, kv, lr, train_examples, test_examples, epochs, batch_size, seed=0, vocab_size=VOCAB,
    model_kwargs: dict | None = None, device: str = "cpu", max_seconds: float | None = None,
    target: float = 0.99, on_epoch=None,
):  # fmt: skip
    """Train one MQAR model; test accuracy after every epoch, early stop at `target`. `max_seconds` (a time budget
    for the training steps) stops mid-epoch and evaluates once more. `model_kwargs` go to `build_model`; `on_epoch`
    (if given) is called with each epoch's history entry (progress logs of long runs)."""
    torch.manual_seed(seed)
    model = build_model(family, d_model, seq_len, vocab_size, **(model_kwargs or {}))
    if model is None:
        return None
    model.to(device)
    x_train, y_train = mqar(train_examples, seq_len, kv, vocab_size, seed=split_seed("train", seed))
    x_test, y_test = mqar(test_examples, seq_len, kv, vocab_size, seed=split_seed("test", seed))
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    steps_per_epoch = math.ceil(train_examples / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    started, cpu_started, history, best, step = time.time(), time.process_time(), [], 0.0, 0
    out_of_time = False
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(train_examples, device=device)
        for i in range(0, train_examples, batch_size):
            batch = order[i : i + batch_size]
            logits, targets = asked_logits(model, x_train[batch], y_train[batch])
            loss = nn.functional.cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if max_seconds is not None and time.time() - started >= max_seconds:
                out_of_time = True
                break
        acc = evaluate(model, x_test, y_test)
        best = max(best, acc)
        history.append(
            {
                "epoch": epoch + 1 if not out_of_time else round(epoch + (i + batch_size) / train_examples, 3),
                "step": step,
                "loss": float(loss.detach()),
                "test_accuracy": acc,
                "seconds": time.time() - started,
            }
        )
        if on_epoch is not None:
            on_epoch(history[-1])
        if acc >= target or out_of_time:
            break
    return {
        "family": family, "d_model": d_model, "seq_len": seq_len, "kv_pairs": kv, "lr": lr, "seed": seed,
        "test_accuracy": history[-1]["test_accuracy"], "best_test_accuracy": best, "steps": step,
        "seconds": time.time() - started, "cpu_seconds": time.process_time() - cpu_started,
        "stopped": "target" if best >= target else "time budget" if out_of_time else "epochs",
        "state_size": recurrent_state_size(model, family, seq_len),
        "parameters": sum(p.numel() for p in model.parameters()), "history": history,
        "config": {"train_examples": train_examples, "test_examples": test_examples, "epochs": epochs,
                   "batch_size": batch_size, "vocab_size": vocab_size, "power_a": 0.01,
                   **({"heads": model.config.num_attention_heads} if hasattr(model.config, "num_attention_heads")
                      else {"heads": model.config.num_heads}),
                   **{k: v for k, v in (model_kwargs or {}).items() if k != "heads"}, "device": device},
    }  # fmt: skip


def run_key(family, d, seq_len, kv, lr, seed) -> str:
    return f"{family}-d{d}-L{seq_len}-kv{kv}-lr{lr:.2e}-s{seed}"


def _claim(claims: Path, key: str) -> bool:
    """Atomically claim a cell for this process (a file holding its PID); a claim whose process died is taken over."""
    claims.mkdir(parents=True, exist_ok=True)
    path = claims / key
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(path.read_text() or 0), 0)
            return False  # another live process trains this cell
        except (OSError, ValueError):
            path.unlink(missing_ok=True)  # its process died: retry once
            return _claim(claims, key) if not path.exists() else False
    with os.fdopen(fd, "w") as handle:
        handle.write(str(os.getpid()))
    return True


def run_sweep(
    families, d_models, tasks, lrs, train_examples, test_examples, epochs, batch_size, seeds, out_dir=RUNS_DIR,
    vocab_size=None, command: str | None = None,
):  # fmt: skip
    """Every cell not in out_dir/results.jsonl yet; one line per finished run (so the sweep resumes).

    Cells run task by task, then learning rate by learning rate, with every width and family inside, so a sweep
    stopped early still compares the families (and widths, for equal state sizes) on the cells it finished.
    Several processes may run the same sweep at once: each claims a cell before training it (out_dir/claims/)."""
    torch.set_num_threads(1)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_file = out_dir / "results.jsonl"
    available = []
    for family in families:
        if build_model(family, 16, 16, vocab_size=64) is None:
            print(f"{family}: model class not available (amformers.PalimpsaConfig missing): skipped.", flush=True)
        else:
            available.append(family)
    for seq_len, kv in tasks:  # fail now, not hours into the sweep, on a task the generator cannot make
        mqar(1, seq_len, kv, task_vocab(seq_len, vocab_size))
    for seed, (seq_len, kv), lr, d, family in itertools.product(seeds, tasks, lrs, d_models, available):
        key = run_key(family, d, seq_len, kv, lr, seed)
        lines = results_file.read_text().splitlines() if results_file.is_file() else []
        if key in {json.loads(line)["key"] for line in lines} or not _claim(out_dir / "claims", key):
            continue
        result = train_one(
            family, d, seq_len, kv, lr, train_examples, test_examples, epochs, batch_size, seed,
            task_vocab(seq_len, vocab_size),
        )  # fmt: skip
        with results_file.open("a") as handle:  # one write of one line: concurrent sweeps do not interleave
            handle.write(json.dumps({"key": key, "command": command, **result}) + "\n")
        (out_dir / "claims" / key).unlink(missing_ok=True)
        print(f"{key}: acc {result['test_accuracy']:.3f} in {result['seconds']:.0f}s", flush=True)


CLAIM_PAIRS = (("palimpsa", "not_palimpsa"), ("palimpsa", "mamba2"), ("meta_mamba2", "mamba2"))


def claim_comparisons(rows: list[dict]) -> list[dict]:
    """Each metaplastic model against each non-metaplastic peer on the same task and seed, matched once by equal
    recurrent state size (a metaplastic state is twice as large, so its peer is twice as wide) and once by equal
    d_model."""
    comparisons = []
    for family, peer in CLAIM_PAIRS:
        for row in (r for r in rows if r["family"] == family):
            task = (row["seq_len"], row["kv_pairs"], row["seed"])
            for match, key in (("equal state size", "state_size"), ("equal d_model", "d_model")):
                for other in rows:
                    if (
                        other["family"] == peer
                        and (other["seq_len"], other["kv_pairs"], other["seed"]) == task
                        and (other[key] == row[key])
                    ):
                        comparisons.append({
                            "match": match, "seq_len": row["seq_len"], "kv_pairs": row["kv_pairs"], "seed": row["seed"],
                            "model": family, "model_d_model": row["d_model"], "model_state_size": row["state_size"],
                            "model_accuracy": row["best_test_accuracy"],
                            "peer": peer, "peer_d_model": other["d_model"], "peer_state_size": other["state_size"],
                            "peer_accuracy": other["best_test_accuracy"],
                            "difference": row["best_test_accuracy"] - other["best_test_accuracy"],
                        })  # fmt: skip
    return comparisons


def seed_spread(rows: list[dict]) -> list[dict]:
    """Mean, sample std and range of the best-over-lr accuracy for every cell that ran more than one seed."""
    by_cell: dict[tuple, list[float]] = {}
    for row in rows:
        by_cell.setdefault((row["family"], row["d_model"], row["seq_len"], row["kv_pairs"]), []).append(
            row["best_test_accuracy"]
        )
    return [
        {"family": f, "d_model": d, "seq_len": n, "kv_pairs": kv, "seeds": len(acc),
         "mean_accuracy": float(np.mean(acc)), "std_accuracy": float(np.std(acc, ddof=1)),
         "min_accuracy": min(acc), "max_accuracy": max(acc)}
        for (f, d, n, kv), acc in sorted(by_cell.items()) if len(acc) > 1
    ]  # fmt: skip


def summarise(
    runs_file: Path = RUNS_DIR / "results.jsonl", out: Path = RESULTS / "mqar.json",
    command: str = "python -m experiments.mqar.sweep summarise",
) -> dict:  # fmt: skip
    runs = [json.loads(line) for line in runs_file.read_text().splitlines()] if runs_file.is_file() else []
    cells: dict[tuple, dict] = {}
    lrs_tried: dict[tuple, list[float]] = {}
    for run in runs:
        cell = (run["family"], run["d_model"], run["seq_len"], run["kv_pairs"], run["seed"])
        lrs_tried.setdefault(cell, []).append(run["lr"])
        if cell not in cells or run["best_test_accuracy"] > cells[cell]["best_test_accuracy"]:
            cells[cell] = run
    rows = [  # each kept row carries its per-epoch history (loss, accuracy), so the docs' curves can be checked
        {**{k: v for k, v in run.items() if k not in ("key", "command")}, "lrs_tried": len(lrs_tried[cell])}
        for cell, run in cells.items()
    ]
    # the settings every run shared; the rest (the vocabulary grows with seq_len) stays in each row's config
    shared_config = (
        {k: v for k, v in runs[0]["config"].items() if all(r["config"].get(k) == v for r in runs)} if runs else None
    )
    lengths = sorted({r["seq_len"] for r in runs})
    vocab_by_length = {str(n): sorted({r["config"]["vocab_size"] for r in runs if r["seq_len"] == n}) for n in lengths}
    result = {
        "claim": "Palimpsa beats its non-metaplastic twin and Mamba2 on MQAR at equal state size (Bonnet et al.)",
        "claim_comparisons": claim_comparisons(rows),
        "command": command,
        "sweep_command": " ; ".join(c for c in dict.fromkeys(r.get("command") for r in runs) if c) or None,
        "config": shared_config,
        "vocab_size_by_seq_len": vocab_by_length,
        "git_commit": git_commit(),
        "best_over_lr": sorted(rows, key=lambda r: (r["family"], r["d_model"], r["seq_len"], r["kv_pairs"], r["seed"])),
        "seed_spread": seed_spread(rows),
        "runs": len(runs),
        "training_seconds_total": sum(r["seconds"] for r in runs),  # one core per run; the CPU cost of the sweep
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run")
    run.add_argument("--families", nargs="*", default=list(FAMILIES), choices=FAMILIES)
    run.add_argument("--d-models", type=int, nargs="*", default=[64, 128])
    run.add_argument("--tasks", nargs="*", default=[f"{a}x{b}" for a, b in DEFAULT_TASKS], help="SEQLENxKV")
    run.add_argument("--lrs", type=float, nargs="*", default=list(DEFAULT_LRS))
    run.add_argument("--train-examples", type=int, default=16_000)
    run.add_argument("--test-examples", type=int, default=1_000)
    run.add_argument("--epochs", type=int, default=4)
    run.add_argument("--batch-size", type=int, default=64)
    run.add_argument("--seeds", type=int, nargs="*", default=[0])
    run.add_argument("--vocab-size", type=int, default=None, help="default: max(256, 2 * seq_len) per task")
    run.add_argument("--out-dir", type=Path, default=RUNS_DIR)
    summary = commands.add_parser("summarise")
    summary.add_argument("--runs-file", type=Path, default=RUNS_DIR / "results.jsonl")
    summary.add_argument("--out", type=Path, default=RESULTS / "mqar.json")
    from . import validate

    validate.add_arguments(commands.add_parser("validate", help="zoology's Figure-2 attention must solve MQAR"))
    args = parser.parse_args(argv)
    if args.command == "validate":
        validate.main(args, argv)
        return
    if args.command == "run":
        tasks = [tuple(int(v) for v in t.split("x")) for t in args.tasks]
        run_sweep(args.families, args.d_models, tasks, args.lrs, args.train_examples, args.test_examples, args.epochs,
                  args.batch_size, args.seeds, args.out_dir, args.vocab_size,
                  "python -m experiments.mqar.sweep " + shlex.join(argv))  # fmt: skip
    else:
        result = summarise(args.runs_file, args.out, "python -m experiments.mqar.sweep " + shlex.join(argv))
        print(f"{result['runs']} runs, {result['training_seconds_total'] / 3600:.1f} CPU-hours -> {args.out}")


if __name__ == "__main__":
    main()
