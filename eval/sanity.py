"""Two quick checks per checkpoint: bf16 against fp32 ("precision") and a generation sample ("generate").

precision: the same texts scored by the fp32 model and by its bf16 copy; we report the mean NLL of each, the
largest per-token log-probability difference, and how often the two agree on the next-token argmax. The check
passes when the mean NLL differs by less than `--tolerance` (relative, default 2%).
generate: greedy and seeded-sampling continuations of a few TinyStories-style prompts, with the KV/recurrent cache.
"""

import time

import torch

from .common import encode, load_model, prefix_token_id, save_result
from .perplexity import TINYSTORIES_VALID, read_stories
from .results import format_table

FALLBACK_TEXTS = [
    "Once upon a time, there was a little girl named Lily. She liked to play in the park with her dog.",
    "Tom and Sam were friends. One day they found a big red ball under the tree.",
]
PROMPTS = ["Once upon a time", "Lily and Tom went to the park. Lily", "One day, a little dog"]


@torch.no_grad()
def token_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits.float()
    return torch.log_softmax(logits[:, :-1], dim=-1)


@torch.no_grad()
def compare_precisions(model, tokenizer, texts: list[str], max_tokens: int = 128) -> dict:
    bf16 = _bf16_copy(model)
    prefix = prefix_token_id(tokenizer)
    nll32, nll16, max_diff, agree, count = 0.0, 0.0, 0.0, 0, 0
    for text in texts:
        ids = torch.tensor([[prefix] + encode(tokenizer, text)[: max_tokens - 1]])
        lp32, lp16 = token_logprobs(model, ids), token_logprobs(bf16, ids)
        targets = ids[:, 1:, None]
        nll32 -= float(lp32.gather(-1, targets).sum())
        nll16 -= float(lp16.gather(-1, targets).sum())
        max_diff = max(max_diff, float((lp32.gather(-1, targets) - lp16.gather(-1, targets)).abs().max()))
        agree += int((lp32.argmax(-1) == lp16.argmax(-1)).sum())
        count += targets.numel()
    return {
        "texts": len(texts),
        "tokens": count,
        "loss_fp32": nll32 / count,
        "loss_bf16": nll16 / count,
        "relative_loss_difference": abs(nll16 - nll32) / max(nll32, 1e-12),
        "max_token_logprob_difference": max_diff,
        "top1_agreement": agree / count,
    }


def _bf16_copy(model):
    import copy

    return copy.deepcopy(model).to(torch.bfloat16).eval()


@torch.no_grad()
def generate_samples(model, tokenizer, prompts=PROMPTS, max_new_tokens: int = 48, seed: int = 0) -> list[dict]:
    prefix = prefix_token_id(tokenizer)
    samples = []
    for prompt in prompts:
        ids = torch.tensor([[prefix] + encode(tokenizer, prompt)])
        mask = torch.ones_like(ids)
        common = {
            "max_new_tokens": max_new_tokens,
            "pad_token_id": prefix if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
        }
        greedy = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **common)
        torch.manual_seed(seed)
        sampled = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, top_k=50, temperature=0.8, **common
        )
        samples.append(
            {
                "prompt": prompt,
                "greedy": tokenizer.decode(greedy[0, ids.shape[1] :], skip_special_tokens=False),
                "sampled_top_k50_t0.8": tokenizer.decode(sampled[0, ids.shape[1] :], skip_special_tokens=False),
            }
        )
    return samples


def texts_for_precision(limit: int | None) -> list[str]:
    if TINYSTORIES_VALID.is_file():
        return read_stories(TINYSTORIES_VALID, limit or 8)
    return FALLBACK_TEXTS


def main_precision(args) -> dict:
    started = time.time()
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
    result = compare_precisions(model, tokenizer, texts_for_precision(args.limit))
    result["tolerance"] = args.tolerance
    result["passed"] = result["relative_loss_difference"] < args.tolerance
    print(format_table([result]))
    metrics = {
        "precision_relative_loss_difference": result["relative_loss_difference"],
        "precision_top1_agreement": result["top1_agreement"],
    }
    settings = {"tolerance": args.tolerance, "max_texts": args.limit or 8}
    tables = {"comparison": [result]}
    save_result(args, "precision", settings=settings, metrics=metrics, tables=tables, model=model, started=started)
    return result


def main_generate(args) -> list[dict]:
    started = time.time()
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
    samples = generate_samples(model, tokenizer, max_new_tokens=args.max_new_tokens, seed=args.sample_seed)
    for sample in samples:
        print(f"--- {sample['prompt']!r}\n[greedy] {sample['greedy']}\n[sampled] {sample['sampled_top_k50_t0.8']}")
    settings = {"max_new_tokens": args.max_new_tokens, "seed": args.sample_seed}
    tables = {"samples": samples}
    save_result(args, "generate", settings=settings, metrics={}, tables=tables, model=model, started=started)
    return samples


def add_precision_arguments(parser):
    parser.add_argument("--tolerance", type=float, default=0.02, help="allowed relative NLL difference")


def add_generate_arguments(parser):
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--sample-seed", type=int, default=0)
