"""The official Palimpsa MQAR configuration on one device, a time budget per family: how far each family gets.

    python bench/mqar_official.py --device cuda                     # bench/results/mqar_official_cuda.json
    python bench/mqar_official.py --device cpu --max-seconds 5 --tiny --out /tmp/x.json   # smoke test of the script

The model and task follow djo1996/Palimpsa `zoology/mqar_figure/configs.py` as issue 18 states it: d_model 128,
2 layers, no MLP, 8 heads of key dim 16, expand_v 2 (value dim 32), vocab 8192, (seq_len, kv pairs) = (512, 128),
batch 128 at seq_len 512, AdamW (weight decay 0.1), cosine schedule, test accuracy after every epoch, early stop at
0.99. The official sweep trains 100,000 examples for 60 epochs over lr logspace(-3, -2, 4) and 8 seeds; this check
trains `--train-examples` (default 20,000: generating 100,000 sequences of vocab 8192 takes minutes of CPU) for at
most `--max-seconds` per family at one lr and one seed, with the cosine schedule over `--epochs` epochs. The
models are experiments/mqar/sweep.py's (`build_model`, with the official "small forgetting" init); on CUDA the
recurrent memory runs its Triton kernels (attn_implementation="amformers_triton").

`--tiny`: d_model 32, (32, 4), vocab 64, 64 training and 32 test examples; it checks the script, it measures
nothing.
"""

import argparse
import functools
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.mqar import sweep  # noqa: E402
from experiments.mqar.task import mqar  # noqa: E402

FAMILIES = ("palimpsa", "not_palimpsa", "mamba2", "meta_mamba2", "attention")
RECURRENT = ("palimpsa", "not_palimpsa", "meta_mamba2", "mamba2")
RESULTS = Path(__file__).resolve().parent / "results"
OFFICIAL = dict(d_model=128, seq_len=512, kv_pairs=128, vocab_size=8192, batch_size=128, test_examples=3_000)
TINY = dict(d_model=32, seq_len=32, kv_pairs=4, vocab_size=64, batch_size=16, test_examples=32, train_examples=64)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="*", default=["palimpsa", "not_palimpsa", "mamba2"], choices=FAMILIES)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--lr", type=float, default=2.15e-3, help="a point of the official logspace(-3, -2, 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=60, help="the cosine schedule's length (official: 60)")
    parser.add_argument("--train-examples", type=int, default=20_000)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="training time budget per family")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: checks the script, measures nothing")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/mqar_official_<device>.json")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/mqar_official.py: no CUDA device (use --device cpu with --tiny to check the script)")
        sys.exit(2)
    shape = {**OFFICIAL, "train_examples": args.train_examples, **(TINY if args.tiny else {})}
    # every family trains on the same data: generate it once (sweep.train_one calls sweep.mqar)
    sweep.mqar = functools.lru_cache(maxsize=2)(mqar)
    if not args.device.startswith("cuda"):
        torch.set_num_threads(1)
    runs = {}
    for family in args.families:
        model_kwargs = {"attn_implementation": "amformers_triton"} if args.device.startswith("cuda") else {}
        if family not in RECURRENT:
            model_kwargs = {}
        started = time.time()
        result = sweep.train_one(
            family, shape["d_model"], shape["seq_len"], shape["kv_pairs"], args.lr, shape["train_examples"],
            shape["test_examples"], args.epochs, shape["batch_size"], args.seed, shape["vocab_size"],
            model_kwargs=model_kwargs, device=args.device, max_seconds=args.max_seconds,
        )  # fmt: skip
        if result is None:
            print(f"{family}: not installed, skipped", flush=True)
            continue
        result["seconds_with_data"] = time.time() - started
        result["seconds_per_step"] = result["history"][-1]["seconds"] / max(1, result["steps"])
        runs[family] = result
        print(f"{family}: best acc {result['best_test_accuracy']:.3f} after {result['steps']} steps "
              f"({result['seconds']:.0f}s, stopped: {result['stopped']})", flush=True)  # fmt: skip
        write(args, argv, shape, runs)  # after every family: a run cut short keeps what it finished
    return write(args, argv, shape, runs, final=True)


def write(args, argv, shape, runs, final=False) -> dict:
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    result = {
        "command": ("python bench/mqar_official.py " + shlex.join(argv)).rstrip(),
        "tiny": args.tiny,
        "device": args.device,
        "device_name": device_name,
        "torch": torch.__version__,
        "shape": shape,
        "lr": args.lr,
        "seed": args.seed,
        "epochs": args.epochs,
        "max_seconds_per_family": args.max_seconds,
        "families_asked": args.families,
        "runs": runs,
        "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    out = args.out or RESULTS / f"mqar_official_{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if final:
        print(f"-> {out}")
    return result


if __name__ == "__main__":
    main()
