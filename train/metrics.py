"""What a pretraining run reports: console lines, the `metrics.jsonl` log and the throughput summary.

`metrics.jsonl` holds one JSON record per line: {"type": "train", "step", "loss", "lr", "grad_norm", "tokens",
"tokens_per_second"} per optimizer step, {"type": "eval", "step", "val_loss", "val_perplexity"} per validation,
and a closing {"type": "summary", ...} with the throughput and the time split. Only the main process writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch

LOG_PREFIX = "[pretrain]"


def log(message: str) -> None:
    print(f"{LOG_PREFIX} {message}", flush=True)


class MetricsLog:
    """JSON Lines records ({"type": "train"|"eval"|"summary", "step": ...}), appended and flushed."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """On resume: drop what the interrupted run logged after its checkpoint (it will be redone)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if record.get("type") in ("train", "eval") and record.get("step", 0) <= step:
                    kept.append(line)
        partial = self.path.with_suffix(".partial")
        partial.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(partial, self.path)

    def write(self, records: list[dict]) -> None:
        if not self.enabled or not records:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
            handle.flush()

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def write_eval(self, step: int, val_loss: float | None) -> None:
        if val_loss is not None:
            self.write([{"type": "eval", "step": step, "val_loss": val_loss, "val_perplexity": math.exp(val_loss)}])


class TrainRecords:
    """Per-step train records, kept on the device and written in batches: one cross-process reduction per flush
    instead of a synchronisation every step."""

    def __init__(self, accelerator, metrics: MetricsLog, tokens_per_step: int):
        self.accelerator = accelerator
        self.metrics = metrics
        self.tokens_per_step = tokens_per_step
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor | None, float, float]] = []

    def add(self, step: int, loss: torch.Tensor, grad_norm, lr: float, seconds: float) -> None:
        """`loss` is this process's share of the step's loss (the shares sum to it)."""
        self.pending.append((step, loss, grad_norm, lr, seconds))

    def flush(self) -> dict | None:
        """Sum the buffered losses over the processes and write them; the last record, or None if none."""
        if not self.pending:
            return None
        losses = self.accelerator.reduce(torch.stack([p[1] for p in self.pending]), reduction="sum").tolist()
        records = [
            {
                "type": "train",
                "step": step,
                "loss": loss,
                "lr": lr,
                "grad_norm": None if norm is None else float(norm),
                "tokens": self.tokens_per_step * step,
                "tokens_per_second": self.tokens_per_step / seconds if seconds > 0 else None,
            }
            for (step, _, norm, lr, seconds), loss in zip(self.pending, losses)
        ]
        self.metrics.write(records)
        self.pending = []
        return records[-1]


class Throughput:
    """Time spent in the optimizer steps of this process, split into forward/backward, data and update. The first
    step pays one-off costs (allocations, the data iterator) and is not counted; neither are evaluation and
    checkpoint writing."""

    def __init__(self):
        self.first = True
        self.steps, self.seconds, self.forward_backward, self.data, self.update = 0, 0.0, 0.0, 0.0, 0.0

    def add(self, seconds: float, forward_backward: float, data: float, update: float) -> None:
        if self.first:
            self.first = False
            return
        self.steps += 1
        self.seconds += seconds
        self.forward_backward += forward_backward
        self.data += data
        self.update += update

    def summary(self, step: int, parameters: int, processes: int, tokens_per_step: int) -> dict:
        seconds = self.seconds
        return {
            "type": "summary",
            "step": step,
            "parameters": parameters,
            "processes": processes,
            "tokens_per_step": tokens_per_step,
            "timed_steps": self.steps,
            "train_seconds": seconds,
            "forward_backward_seconds": self.forward_backward,
            "data_seconds": self.data,  # fetching and collating the micro-batches
            "optimizer_seconds": self.update,  # clipping, AdamW, scheduler, zero_grad
            "tokens_per_second": tokens_per_step * self.steps / seconds if seconds else None,
            "overhead_fraction": 1 - self.forward_backward / seconds if seconds else None,
        }
