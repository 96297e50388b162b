"""Training throughput of AttnStream against transformers' Llama of the same shape, in one run.

    python bench/attn_stream_speed.py            # writes bench/results/attn_stream_speed.json

Every model trains (AdamW, forward + backward + step, fp32, SDPA attention) on the same random batches;
the models take turns, `--rounds` times, and each one's median round counts, so background load on
the machine hurts all of them alike. Throughput is reported as a ratio to Llama. MFU divides the model
FLOPs of a training step (PaLM's count: 6 x matmul parameters + 12 x layers x width x seq_len per token)
by the fp32 matmul peak measured on this machine in the same run (`torch.mm` on 2048-square matrices).
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from amformers import AttnStreamConfig, AttnStreamForCausalLM

SHAPE = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)

VARIANTS = {
    "llama (transformers)": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE)),
    "attn_stream none": lambda: AttnStreamForCausalLM(AttnStreamConfig(**SHAPE, attention_stream="none")),
    "attn_stream values fixed": lambda: AttnStreamForCausalLM(AttnStreamConfig(**SHAPE, attention_stream="values")),
    "attn_stream values learned": lambda: AttnStreamForCausalLM(
        AttnStreamConfig(**SHAPE, attention_stream="values", stream_weighting="learned")
    ),
}


def matmul_peak_flops(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def training_flops_per_token(model, seq_len: int) -> float:
    cfg = model.config
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    if cfg.tie_word_embeddings:  # the tied LM head is a matmul even though its weight is the embedding's
        matmul_params += cfg.vocab_size * cfg.hidden_size
    return 6 * matmul_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "attn_stream_speed.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    batches = [torch.randint(0, SHAPE["vocab_size"], (args.batch, args.seq_len)) for _ in range(args.steps)]
    runs = {}
    for name, build in VARIANTS.items():
        torch.manual_seed(0)
        model = build().train()
        model.set_attn_implementation("sdpa")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        runs[name] = dict(model=model, optimizer=optimizer, seconds=[])

    def train_steps(run, steps):
        model, optimizer = run["model"], run["optimizer"]
        for batch in steps:
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for run in runs.values():  # warm-up: allocator, optimizer state, SDPA dispatch
        train_steps(run, batches[:2])
    peak = matmul_peak_flops()
    for _ in range(args.rounds):
        for run in runs.values():
            start = time.perf_counter()
            train_steps(run, batches)
            run["seconds"].append(time.perf_counter() - start)
    peak = max(peak, matmul_peak_flops())

    tokens = args.steps * args.batch * args.seq_len
    llama_tps = tokens / statistics.median(runs["llama (transformers)"]["seconds"])
    results = []
    for name, run in runs.items():
        tps = tokens / statistics.median(run["seconds"])
        flops = training_flops_per_token(run["model"], args.seq_len)
        results.append(
            dict(
                model=name,
                parameters=sum(p.numel() for p in run["model"].parameters()),
                tokens_per_s=round(tps, 1),
                ratio_to_llama=round(tps / llama_tps, 3),
                mfu=round(tps * flops / peak, 3),
                round_seconds=[round(s, 3) for s in run["seconds"]],
            )
        )
    report = dict(
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        settings=vars(args) | {"shape": SHAPE, "dtype": "float32", "attn_implementation": "sdpa"},
        machine=dict(
            cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(), torch=torch.__version__
        ),
        matmul_peak_gflops=round(peak / 1e9, 1),
        results=results,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s on {torch.get_num_threads()} threads")
    print(f"{'model':<28} {'params':>10} {'tokens/s':>10} {'vs llama':>9} {'MFU':>6}")
    for row in results:
        print(
            f"{row['model']:<28} {row['parameters']:>10,} {row['tokens_per_s']:>10,.0f} "
            f"{row['ratio_to_llama']:>9.3f} {row['mfu']:>6.1%}"
        )


if __name__ == "__main__":
    main()
