"""Reddy (2023)'s bursty in-context classification task and two-layer attention-only network, as run by Burns et
al. (toy-Transformer/ic_vs_iw_v3*.py, datasets_v2.py, transformer_v2_v_residuals_{V1,Q1,K1}.py), in PyTorch.

Data: K = 512 classes of Gaussian clusters in D = 85 dims (eps = 0.1), L = 32 labels (class k has label k mod L),
N = 8 exemplar-label pairs + a query = 17 tokens of 65 positional dims (a 17x17 identity at a random shift in
[0, 48]) + 85 content dims. Bursty sequences (fraction p_B = 0.5) hold 4 classes with distinct labels x B = 2
copies and the query's class is one of them; the others hold 8 random classes and a random query class. A fraction
p_C = 0.5 of sequences uses 128 novel classes drawn afresh at every call (solvable only in context).
Test sets (10,000 sequences each, fixed per run): test (training distribution), ic (p_B = p_C = 1), ic2 (p_B = 1,
p_C = 0, context labels flipped to label + 1 mod L and scored against the flipped label), iw (4 copies of 2 classes
non-bursty: p_B = 0, p_C = 0, in-weights only).

Model: two single-head attention layers without scaling, LayerNorm or output projection (x <- x + A(x)), causal,
then 3 ReLU layers 150 -> 150 with a scalar bias each (no residual) and a 32-way readout of the last token.
Init N(0, 1/D) for Q, K, V; He for the MLP; 1/sqrt(150) for the readout. Plain SGD, lr 0.01, multiplicative
weight decay (1 - 1e-6), batch 128 of fresh sequences, at most 75,000 iterations, test accuracies every 500.

Streams (layer 2 only; the raw layer-1 projection is of the layer-1 input x0):
  baseline   A2 = softmax(k2 . q2),        values v2
  values     values v2 + v1                              (the paper's V1 files)
  queries    scores k2 . (q2 + q1)                      (Q1 files)
  keys       scores (k2 + k1) . q2                      (K1 files)
  learned-*  w_own * own + w_src * source with a trainable (w_own, w_src) pair, initialised (1, 1)

    python -m experiments.icl_reddy.run train --variant values --seed 0      # one resumable run in runs/icl_reddy/
    python -m experiments.icl_reddy.run launch --seeds 0 1 2 --workers 2     # every variant x seed, niced
    python -m experiments.icl_reddy.run summarise                          # finished runs -> results/
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from amformers.eval.results import git_commit

from .. import REPO_ROOT, RUNS_ROOT

K, L, N, NMAX, D = 512, 32, 8, 32, 85
K_NOVEL, EPS = 128, 0.1
INPUT_DIM = 2 * NMAX + 1 + D  # 150
SEQ_LEN = 2 * N + 1  # 17
VARIANTS = ("baseline", "values", "keys", "queries", "learned-values", "learned-keys", "learned-queries")
TEST_SETS = ("test", "ic", "ic2", "iw")
RUNS_DIR = RUNS_ROOT / "icl_reddy"
RESULTS = Path(__file__).resolve().parent / "results"


class TaskData:
    """Class means and label vectors of one run, and the sequence generator of datasets_v2.py (vectorised)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.mus_label = rng.normal(size=(L, D)) / np.sqrt(D)
        self.mus_class = rng.normal(size=(K, D)) / np.sqrt(D)

    def _distinct_label_classes(self, size: int, num_classes: int, groups: int) -> np.ndarray:
        """`groups` classes per sequence with distinct labels (no_repeats=True): class = position * L + label."""
        labels = np.argsort(self.rng.random((size, L)), axis=1)[:, :groups]
        positions = self.rng.integers(0, num_classes // L, size=(size, groups))
        return positions * L + labels

    def _bursty(self, size: int, num_classes: int, burstiness: int) -> tuple[np.ndarray, np.ndarray]:
        groups = N // burstiness
        choices = np.tile(self._distinct_label_classes(size, num_classes, groups), burstiness)
        choices = np.take_along_axis(choices, np.argsort(self.rng.random((size, N)), axis=1), axis=1)
        targets = choices[np.arange(size), self.rng.integers(0, N, size=size)]
        return choices, targets

    def sample(self, size: int, burstiness=2, p_bursty=0.5, p_novel=0.5, flip_labels=False):
        """(inputs [size, 17, 150] float32, target labels [size], target labels to score against [size])."""
        rng = self.rng
        if burstiness == 0:  # datasets_v2: B = 0 means N/2 copies and no bursty sequences
            burstiness, p_bursty = N // 2, 0.0
        if N % burstiness or burstiness >= N:
            raise ValueError(f"N={N} must be divisible by the burstiness {burstiness} < N.")
        e_fac = 1 / np.sqrt(1 + EPS**2)
        mus_novel = rng.normal(size=(K_NOVEL, D)) / np.sqrt(D)

        choices, targets = self._bursty(size, K, burstiness)
        choices_novel, targets_novel = self._bursty(size, K_NOVEL, burstiness)
        not_bursty = rng.random(size) > p_bursty
        choices[not_bursty] = rng.integers(0, K, size=(int(not_bursty.sum()), N))
        targets[not_bursty] = rng.integers(0, K, size=int(not_bursty.sum()))
        known = rng.random(size) > p_novel

        means = np.where(known[:, None, None], self.mus_class[choices], mus_novel[choices_novel])
        query_means = np.where(known[:, None], self.mus_class[targets], mus_novel[targets_novel])
        context_labels = np.where(known[:, None], choices % L, choices_novel % L)
        if flip_labels:  # only the known-class sequences' context labels are flipped, as in datasets_v2
            context_labels = np.where(known[:, None], (context_labels + 1) % L, context_labels)
        target_labels = np.where(known, targets % L, targets_novel % L)

        inputs = np.zeros((size, SEQ_LEN, INPUT_DIM), dtype=np.float32)
        content = slice(2 * NMAX + 1, None)
        inputs[:, 0:-1:2, content] = e_fac * (means + EPS * rng.normal(size=(size, N, D)) / np.sqrt(D))
        inputs[:, 1:-1:2, content] = self.mus_label[context_labels]
        inputs[:, -1, content] = e_fac * (query_means + EPS * rng.normal(size=(size, D)) / np.sqrt(D))
        shifts = rng.integers(0, 2 * NMAX + 1 - SEQ_LEN + 1, size=size)
        rows = np.arange(size)[:, None]
        inputs[rows, np.arange(SEQ_LEN)[None, :], shifts[:, None] + np.arange(SEQ_LEN)[None, :]] = 1.0
        scored = (target_labels + 1) % L if flip_labels else target_labels
        return torch.from_numpy(inputs), torch.from_numpy(target_labels), torch.from_numpy(scored)

    def test_sets(self, size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        sets = {
            "test": self.sample(size),
            "ic": self.sample(size, p_bursty=1.0, p_novel=1.0),
            "ic2": self.sample(size, p_bursty=1.0, p_novel=0.0, flip_labels=True),
            "iw": self.sample(size, burstiness=0, p_bursty=0.0, p_novel=0.0),
        }
        return {name: (inputs, scored) for name, (inputs, _, scored) in sets.items()}


class TwoLayerAttention(nn.Module):
    """The toy network of transformer_v2*.py with an optional residual stream from layer 1 into layer 2."""

    def __init__(self, variant: str = "baseline", generator: torch.Generator | None = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"Unknown variant {variant!r}; choose from {VARIANTS}.")
        self.variant = variant
        self.stream = None if variant == "baseline" else variant.removeprefix("learned-")

        def normal(*shape, std):
            return nn.Parameter(torch.randn(*shape, generator=generator) * std)

        self.qkv = nn.ParameterList([normal(3, INPUT_DIM, INPUT_DIM, std=1 / np.sqrt(D)) for _ in range(2)])
        self.mlp_weights = nn.ParameterList(
            [normal(INPUT_DIM, INPUT_DIM, std=np.sqrt(2 / INPUT_DIM)) for _ in range(3)]
        )
        self.mlp_biases = nn.ParameterList([normal(1, std=np.sqrt(1 / INPUT_DIM)) for _ in range(3)])
        self.readout = normal(L, INPUT_DIM, std=1 / np.sqrt(INPUT_DIM))
        # (w_own, w_src) of layer 2's mix; trainable only for the learned variants.
        self.stream_weights = nn.Parameter(torch.ones(2), requires_grad=variant.startswith("learned-"))
        mask = torch.full((SEQ_LEN, SEQ_LEN), float("-inf")).triu(1)  # query j sees keys i <= j
        self.register_buffer("mask", mask, persistent=False)

    def mix(self, index: int, own: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Layer 2's streamed projection `index` (0 = q, 1 = k, 2 = v): w_own * own + w_src * source."""
        if self.stream is None or index != {"queries": 0, "keys": 1, "values": 2}[self.stream]:
            return own
        return self.stream_weights[0] * own + self.stream_weights[1] * source

    def forward(self, x):
        """Logits of the last token. Only the last position reaches the readout, so layer 2 and the MLP run on the
        last query alone (the same function and gradients as `forward_all_positions`, 3x cheaper)."""
        q1, k1, v1 = (x @ w.T for w in self.qkv[0])
        x = x + torch.softmax(q1 @ k1.transpose(-1, -2) + self.mask, dim=-1) @ v1
        wq, wk, wv = self.qkv[1]
        q = self.mix(0, x[:, -1:] @ wq.T, q1[:, -1:])
        k = self.mix(1, x @ wk.T, k1)
        v = self.mix(2, x @ wv.T, v1)
        h = x[:, -1] + (torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v)[:, 0]  # the last query sees every key
        for weight, bias in zip(self.mlp_weights, self.mlp_biases):
            h = torch.relu(h @ weight.T + bias)
        return h @ self.readout.T

    def forward_all_positions(self, x):
        """Reference: the official network literally (every position through both layers and the MLP)."""
        raw = []
        for layer, weights in enumerate(self.qkv):
            q, k, v = (x @ w.T for w in weights)
            if layer == 1:
                q, k, v = (self.mix(i, t, raw[i]) for i, t in enumerate((q, k, v)))
            raw = raw or [x @ w.T for w in weights]
            x = x + torch.softmax(q @ k.transpose(-1, -2) + self.mask, dim=-1) @ v
        for weight, bias in zip(self.mlp_weights, self.mlp_biases):
            x = torch.relu(x @ weight.T + bias)
        return x[:, -1] @ self.readout.T


@torch.no_grad()
def accuracies(model, sets, chunk: int = 2500) -> dict[str, float]:
    result = {}
    for name, (inputs, labels) in sets.items():
        hits = sum(
            int((model(inputs[i : i + chunk]).argmax(-1) == labels[i : i + chunk]).sum())
            for i in range(0, len(labels), chunk)
        )
        result[name] = hits / len(labels)
    return result


def train(variant: str, seed: int, iterations=75_000, eval_every=500, test_size=10_000, batch_size=128, lr=0.01,
          weight_decay=1e-6, target=0.95, stop_sets=TEST_SETS, run_dir: Path | None = None) -> dict:  # fmt: skip
    """One run; resumes from run_dir/state.pt. Stops early once every test set in `stop_sets` reaches `target`."""
    torch.set_num_threads(1)
    run_dir = Path(run_dir or RUNS_DIR / f"{variant}_s{seed}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "running.pid").write_text(str(os.getpid()))  # so a launcher does not start this run twice
    data = TaskData(np.random.default_rng([seed, 2023]))
    sets = data.test_sets(test_size)
    model = TwoLayerAttention(variant, torch.Generator().manual_seed(seed))
    history, step, started, elapsed = [], 0, time.time(), 0.0
    state_path = run_dir / "state.pt"
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        data.rng.bit_generator.state = state["rng"]
        history, step, elapsed = state["history"], state["step"], state["elapsed"]
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum, loss_count = 0.0, 0

    def finished(record: dict) -> bool:
        return record["step"] >= iterations or bool(stop_sets) and all(record[s] >= target for s in stop_sets)

    while not (history and history[-1]["step"] == step and finished(history[-1])):  # a resumed run may be done
        if step % eval_every == 0 and (not history or history[-1]["step"] != step):
            record = {"step": step, "train_loss": loss_sum / max(loss_count, 1), **accuracies(model, sets)}
            record["seconds"] = elapsed + time.time() - started
            if model.stream_weights.requires_grad:
                record["stream_weights"] = model.stream_weights.tolist()
            history.append(record)
            loss_sum, loss_count = 0.0, 0
            print(json.dumps(record), flush=True)
            torch.save(
                {"model": model.state_dict(), "rng": data.rng.bit_generator.state, "history": history, "step": step,
                 "elapsed": record["seconds"]},
                state_path,
            )  # fmt: skip
            if finished(record):
                break
        inputs, labels, _ = data.sample(batch_size)
        loss = nn.functional.cross_entropy(model(inputs), labels)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.mul_(1 - weight_decay).sub_(lr * g)
        loss_sum, loss_count = loss_sum + float(loss.detach()), loss_count + 1
        step += 1
    result = {
        "variant": variant,
        "seed": seed,
        "finished": True,
        "steps_run": step,
        "steps_to_target": steps_to(history, target),
        "config": {"iterations": iterations, "eval_every": eval_every, "test_size": test_size, "batch_size": batch_size,
                   "lr": lr, "weight_decay": weight_decay, "target": target, "stop_sets": list(stop_sets)},
        "history": history,
    }  # fmt: skip
    (run_dir / "result.json").write_text(json.dumps(result) + "\n")
    (run_dir / "running.pid").unlink(missing_ok=True)
    return result


def steps_to(history: list[dict], target: float) -> dict[str, int | None]:
    """First evaluated step at which each test set reached `target` (None: never)."""
    return {s: next((h["step"] for h in history if h[s] >= target), None) for s in TEST_SETS}


def _running_pid(run_dir: Path) -> int | None:
    """PID of a live process training in `run_dir` (its running.pid file), else None."""
    try:
        pid = int((run_dir / "running.pid").read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def launch(variants, seeds, workers: int, extra: list[str]) -> None:
    """Run every (variant, seed) not finished yet, `workers` at a time (counting runs another launcher started),
    at niceness 10, logs in runs/icl_reddy/."""
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    # The claim compares the first two variants (baseline, values): run those for every seed first.
    order = [(v, s) for s in seeds for v in variants[:2]] + [(v, s) for s in seeds for v in variants[2:]]
    pending = [(v, s) for v, s in order if not (RUNS_DIR / f"{v}_s{s}" / "result.json").is_file()]
    nice = ["nice", "-n", str(max(0, 10 - os.nice(0)))]  # niceness 10 in all, even from a niced launcher
    children: list[subprocess.Popen] = []
    while pending:
        children = [c for c in children if c.poll() is None]  # poll() reaps finished children (no zombie PIDs)
        pending = [(v, s) for v, s in pending if not (RUNS_DIR / f"{v}_s{s}" / "result.json").is_file()]
        busy = sum(_running_pid(RUNS_DIR / f"{v}_s{s}") is not None for v, s in order)
        startable = [(v, s) for v, s in pending if _running_pid(RUNS_DIR / f"{v}_s{s}") is None]
        if busy >= workers or not startable:
            time.sleep(10)
            continue
        variant, seed = startable[0]
        pending.remove((variant, seed))
        log = open(RUNS_DIR / f"{variant}_s{seed}.log", "a")  # noqa: SIM115  (closed when the child exits)
        command = [
            sys.executable,
            "-m",
            "experiments.icl_reddy.run",
            "train",
            "--variant",
            variant,
            "--seed",
            str(seed),
        ]
        process = subprocess.Popen(
            [*nice, *command, *extra], stdout=log, stderr=subprocess.STDOUT, env=os.environ, cwd=REPO_ROOT
        )
        children.append(process)
        (RUNS_DIR / f"{variant}_s{seed}").mkdir(parents=True, exist_ok=True)
        (RUNS_DIR / f"{variant}_s{seed}" / "running.pid").write_text(str(process.pid))
        time.sleep(2)


def summarise(out: Path = RESULTS / "icl_reddy.json", runs_dir: Path = RUNS_DIR) -> dict:
    """Collect finished runs into one results file (unfinished runs are listed, not summarised)."""
    runs, unfinished = [], []
    for run_dir in sorted(Path(runs_dir).glob("*_s*")):
        if not run_dir.is_dir():
            continue
        result_file = run_dir / "result.json"
        if result_file.is_file():
            runs.append(json.loads(result_file.read_text()))
        elif (run_dir / "state.pt").is_file():
            state = torch.load(run_dir / "state.pt", weights_only=False)
            last = state["history"][-1] if state["history"] else {}
            unfinished.append({"run": run_dir.name, "step": state["step"], "last_eval": last})
    by_variant: dict[str, dict] = {}
    for run in runs:
        entry = by_variant.setdefault(run["variant"], {"seeds": [], "steps_to_target": {s: [] for s in TEST_SETS}})
        entry["seeds"].append(run["seed"])
        for s in TEST_SETS:
            entry["steps_to_target"][s].append(run["steps_to_target"][s])
    for entry in by_variant.values():
        entry["summary"] = {}
        for s, values in entry["steps_to_target"].items():
            reached = [v for v in values if v is not None]
            entry["summary"][s] = {
                "reached": f"{len(reached)}/{len(values)}",
                "mean": float(np.mean(reached)) if reached else None,
                "std": float(np.std(reached)) if reached else None,
                "min": min(reached) if reached else None,
                "max": max(reached) if reached else None,
            }
    baseline = by_variant.get("baseline", {}).get("summary", {})
    for entry in by_variant.values():
        entry["speedup_vs_baseline"] = {
            s: (1 - entry["summary"][s]["mean"] / baseline[s]["mean"])
            if baseline.get(s, {}).get("mean") and entry["summary"][s]["mean"] and len(entry["seeds"]) else None
            for s in TEST_SETS
        }  # fmt: skip
        # The same seed gives every variant the same data and the same initial weights: a paired comparison.
        baseline_ic = {r["seed"]: r["steps_to_target"]["ic"] for r in runs if r["variant"] == "baseline"}
        entry["paired_ic_speedup_by_seed"] = {
            seed: 1 - steps / baseline_ic[seed]
            for seed, steps in zip(entry["seeds"], entry["steps_to_target"]["ic"])
            if steps and baseline_ic.get(seed)
        }
    result = {
        "claim": "values stream reaches 95% ICL accuracy 24% faster than the baseline (Burns et al., Reddit post)",
        "command": "python -m experiments.icl_reddy.run summarise",
        "git_commit": git_commit(),
        "variants": by_variant,
        "unfinished_runs": unfinished,
        "runs": [{k: v for k, v in r.items()} for r in runs],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("train", help="one resumable run")
    one.add_argument("--variant", choices=VARIANTS, required=True)
    one.add_argument("--seed", type=int, required=True)
    many = commands.add_parser("launch", help="every variant x seed in the background, niced")
    many.add_argument("--variants", nargs="*", default=["baseline", "values", "keys", "queries", "learned-values"])
    many.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    many.add_argument("--workers", type=int, default=2)
    for sub in (one, many):
        sub.add_argument("--iterations", type=int, default=75_000)
        sub.add_argument("--eval-every", type=int, default=500)
        sub.add_argument("--test-size", type=int, default=10_000)
        sub.add_argument(
            "--stop-sets", nargs="*", choices=TEST_SETS, default=list(TEST_SETS), help="stop when all >= 95%"
        )
    commands.add_parser("summarise", help="finished runs -> experiments/icl_reddy/results/icl_reddy.json")
    args = parser.parse_args(argv)
    if args.command == "train":
        train(args.variant, args.seed, args.iterations, args.eval_every, args.test_size, stop_sets=args.stop_sets)
    elif args.command == "launch":
        extra = [
            "--iterations",
            str(args.iterations),
            "--eval-every",
            str(args.eval_every),
            "--test-size",
            str(args.test_size),
            "--stop-sets",
            *args.stop_sets,
        ]
        launch(args.variants, args.seeds, args.workers, extra)
    else:
        result = summarise()
        for variant, entry in result["variants"].items():
            print(variant, json.dumps(entry["summary"]), json.dumps(entry["speedup_vs_baseline"]))


if __name__ == "__main__":
    main()
