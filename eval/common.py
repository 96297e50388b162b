"""Shared pieces of the language-model evaluations: loading a saved model, scoring text, saving a suite's result.

Scoring follows lm-eval's conventions so our suites and the lm-eval tasks agree: a continuation is
scored by the summed log-probability of its tokens given the context, trailing spaces of the context
move to the continuation, and the context is split off the jointly encoded string. Unlike lm-eval we
always start every sequence with the tokenizer's BOS (or EOS) token, because our models are trained
on documents separated by that token: it is the "start of a story" state, and it lets the first word
of a sentence be scored.
"""

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model_folder import require_model_folder
from .results import provenance, result_path, write_result

# tqdm's own switch, read when tqdm is imported (so it silences every bar when set before the command starts); our
# bars also read it at run time, so `python -m amformers.eval --quiet`, which sets it, turns them off.
QUIET_ENV = "TQDM_DISABLE"


def progress(iterable=None, *, total: int | None = None, desc: str | None = None, unit: str = "it"):
    """The evaluation suites' progress bar: tqdm on stderr with a total (so it shows an ETA).

    It draws only when stderr is a terminal (stdout, which tests and scripts parse, is never touched) and not
    under `--quiet` ($TQDM_DISABLE). Without a `desc` there is no bar at all: inner loops stay silent.
    """
    from tqdm.auto import tqdm

    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    # None: tqdm turns itself off when stderr is not a TTY
    disable = True if not desc or os.environ.get(QUIET_ENV, "").lower() in ("1", "true") else None
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, dynamic_ncols=True)


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Model and tokenizer saved in `model_dir`, in eval mode on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import amformers  # noqa: F401  (registers our model types with the Auto classes)

    model_dir = require_model_folder(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model.eval()
    return model, tokenizer


def prefix_token_id(tokenizer) -> int:
    """The token every scored sequence starts with: BOS, else EOS (lm-eval's rule for empty contexts)."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise ValueError("The tokenizer has neither a BOS nor an EOS token to start a scored sequence with.")


def model_max_length(model, override: int | None = None) -> int:
    if override is not None:
        return override
    return int(getattr(model.config, "max_position_embeddings", None) or 2048)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: move trailing spaces to the continuation, encode jointly, then split."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


@dataclass
class ContinuationScore:
    logprob: float  # summed log-probability of the continuation tokens (nats)
    is_greedy: bool  # every continuation token is the argmax of its next-token distribution
    num_tokens: int


@torch.no_grad()
def score_continuations(
    model,
    tokenizer,
    pairs: list[tuple[str, str]],
    batch_size: int = 16,
    max_length: int | None = None,
    desc: str | None = None,
) -> list[ContinuationScore]:
    """Log-probability of each continuation given its context (an empty context is allowed); `desc` names the
    progress bar over the batches (none without it)."""
    prefix = prefix_token_id(tokenizer)
    max_length = model_max_length(model, max_length)
    requests = []
    for context, continuation in pairs:
        if context:
            context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        else:
            context_ids, continuation_ids = [], encode(tokenizer, continuation)
        if not continuation_ids:
            raise ValueError(f"Continuation {continuation!r} encodes to no tokens.")
        ids = ([prefix] + context_ids + continuation_ids)[-max_length:]
        if len(continuation_ids) >= len(ids):
            raise ValueError(f"Continuation of {len(continuation_ids)} tokens does not fit max_length={max_length}.")
        requests.append((ids, len(continuation_ids)))
    return _score_requests(model, requests, batch_size, pad_id=prefix, desc=desc)


def _score_requests(model, requests: list[tuple[list[int], int]], batch_size: int, pad_id: int, desc=None):
    """Score the last `n` tokens of each id list; batches are right-padded (harmless for causal models)."""
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    scores: list[ContinuationScore | None] = [None] * len(requests)
    device = next(model.parameters()).device
    for start in progress(range(0, len(order), batch_size), desc=desc, unit="batch"):
        batch = [requests[i] for i in order[start : start + batch_size]]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        for row, (ids, _) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
        logprobs = torch.log_softmax(model(input_ids=input_ids.to(device)).logits.float(), dim=-1).cpu()
        for row, (ids, n) in enumerate(batch):
            positions = torch.arange(len(ids) - n - 1, len(ids) - 1)
            targets = torch.tensor(ids[-n:])
            step = logprobs[row, positions]
            scores[order[start + row]] = ContinuationScore(
                logprob=float(step.gather(-1, targets[:, None]).sum()),
                is_greedy=bool((step.argmax(-1) == targets).all()),
                num_tokens=n,
            )
    return scores


@torch.no_grad()
def document_nll(model, tokenizer, text: str, max_length: int | None = None, stride: int | None = None):
    """(summed NLL in nats, number of predicted tokens) of `text`, starting from the prefix token.

    Texts longer than the model's window are scored with overlapping windows (HF's perplexity recipe):
    each window advances by `stride` tokens and scores only the tokens no earlier window scored, with
    the rest of the window as context. Every token is scored exactly once.
    """
    max_length = model_max_length(model, max_length)
    stride = stride or max(1, max_length // 2)
    if not 0 < stride <= max_length - 1:
        raise ValueError(f"stride ({stride}) must lie in [1, max_length - 1 = {max_length - 1}].")
    ids = [prefix_token_id(tokenizer)] + encode(tokenizer, text)
    targets_total = len(ids) - 1
    requests, scored = [], 0
    while scored < targets_total:
        end = min(scored + stride, targets_total) if scored else min(max_length - 1, targets_total)
        window = ids[max(0, end + 1 - max_length) : end + 1]
        requests.append((window, end - scored))
        scored = end
    logprob = sum(s.logprob for s in _score_requests(model, requests, batch_size=4, pad_id=ids[0]))
    return -logprob, targets_total


def run_command() -> str:
    """The command line that produced a result, for the results file."""
    argv = [Path(sys.executable).name, *sys.argv]
    if sys.argv and sys.argv[0].endswith("__main__.py"):
        argv = ["python", "-m", "amformers.eval", *sys.argv[1:]]
    return shlex.join(argv)


def model_summary(model) -> dict:
    config = model.config
    return {
        "model_type": config.model_type,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        **{
            key: getattr(config, key)
            for key in ("hidden_size", "num_hidden_layers", "vocab_size", "attention_stream", "stream_weighting")
            if hasattr(config, key)
        },
    }


def save_result(args, suite: str, *, settings: dict, metrics: dict, tables: dict, model=None, started=None) -> Path:
    """Write a suite's result for the model of `args` (--model, --name, --results-dir) and say where it went."""
    name = args.name or Path(args.model).resolve().name
    summary = model_summary(model) if model is not None else None
    if summary is not None:
        metrics = {"parameters": summary["num_parameters"], **metrics}
    path = write_result(
        result_path(name, suite, args.results_dir), model=name, suite=suite,
        command=getattr(args, "command", None) or run_command(), settings=settings, metrics=metrics, tables=tables,
        provenance=provenance(args.model, started, summary),
    )  # fmt: skip
    print(f"wrote {path}")
    return path
