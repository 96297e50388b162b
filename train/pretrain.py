"""Pretrain an amformers model: the command line of the one pretraining loop, on Accelerate.

    accelerate launch -m amformers.train.pretrain --config train/configs/attn_stream-8m.yaml --output_dir runs/a8m
    python -m amformers.train.pretrain --config train/configs/tiny-attn_stream.yaml --max_steps 20
    accelerate launch --config_file train/accelerate/fsdp.yaml -m amformers.train.pretrain \
        --config train/configs/attn_stream-1b.yaml --output_dir runs/a1b --resume

The YAML names a `model_type` and a `model:` dict of config fields; the model is
`AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **model))` after `import amformers`,
so every registered family trains through this same loop. Scaling past one machine is Accelerate's
job (DDP, FSDP, DeepSpeed through `accelerate launch --config_file`); nothing here is distributed by hand.

The parts, in `amformers.train`: `config` (schema, defaults, validation, model and optimizer building),
`data` (corpus to blocks, loaders), `loop` (the training loop), `checkpoints` (atomic save, verify, resume),
`metrics` (metrics.jsonl), `export` (final model, samples, model card, Hub).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..corpus import add_data_dir_argument
from .checkpoints import CheckpointError
from .config import build_model, build_model_config, count_parameters, load_config
from .loop import train
from .metrics import LOG_PREFIX
from .tokenizer import load_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags; `--output_dir` defaults to runs/<config name> under the current directory."""
    parser = argparse.ArgumentParser(
        prog="python -m amformers.train.pretrain",
        description="Pretrain an amformers model (any registered family) with Accelerate.",
        epilog=(
            "examples:\n"
            "  python -m amformers.train.pretrain --config train/configs/tiny-attn_stream.yaml --max_steps 20 --cpu\n"
            "  python -m amformers.train.pretrain --config train/configs/palimpsa-8m.yaml --dry_run\n"
            "  accelerate launch -m amformers.train.pretrain --config train/configs/attn_stream-8m.yaml "
            "--output_dir runs/a8m --cpu\n"
            "\nA progress bar (stderr) shows the step, loss, learning rate, tokens/s and the ETA;\n"
            "metrics.jsonl in the output folder logs every step."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="pretraining YAML (see train/configs/)")
    parser.add_argument("--output_dir", default=None, help="default: runs/<config name>")
    parser.add_argument("--max_steps", type=int, default=None, help="overrides training.max_steps")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from the latest checkpoint in output_dir (or from the checkpoint folder given)",
    )
    parser.add_argument("--dry_run", action="store_true", help="build the model on the meta device, print its size")
    add_data_dir_argument(parser)  # overrides the config's data.root
    parser.add_argument("--cache_dir", default=None, help="datasets cache for the tokenized data (data.cache_dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id", default=None, help="namespace/name of the Hub repository")
    parser.add_argument("--hub_private", action="store_true")
    parser.add_argument("--hub_token", default=None, help="default: HF_TOKEN or the cached login")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    if args.output_dir is None:
        args.output_dir = str(Path("runs") / Path(args.config).stem)
    return args


def main(argv: list[str] | None = None):
    """Run the command line (`--dry_run`: the parameter count; else the output folder of the training run)."""
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"training.max_steps={args.max_steps}")
    if args.data_dir is not None:
        overrides.append(f"data.root={json.dumps(args.data_dir)}")
    if args.cache_dir is not None:
        overrides.append(f"data.cache_dir={json.dumps(args.cache_dir)}")
    config = load_config(args.config, overrides)

    if args.dry_run:
        tokenizer = load_tokenizer(config["tokenizer"])
        model = build_model(build_model_config(config, tokenizer), config["attn_implementation"], device="meta")
        parameters = count_parameters(model)
        embedding = model.get_input_embeddings().weight.numel()
        print(f"model_type: {config['model_type']}")
        print(f"parameters: {parameters}")
        print(f"non-embedding parameters: {parameters - embedding}")
        return parameters
    return train(args, config)


if __name__ == "__main__":
    try:
        main()
    except CheckpointError as error:
        print(f"{LOG_PREFIX} error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
