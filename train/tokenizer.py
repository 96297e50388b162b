"""Byte-level BPE tokenizer: trained with `tokenizers`, saved as a transformers fast tokenizer.

Retrain the shipped tokenizer (train/tokenizer/) on the default mix's training split, one command:

    python -m amformers.train.tokenizer

or on the training split of any pretraining config, with another size, somewhere else:

    python -m amformers.train.tokenizer --config my.yaml --vocab_size 16384 --output_dir runs/tok16k

Three special tokens with distinct ids: `<|pad|>` = 0, `<|bos|>` = 1 (prepended to every encoded
text by the post-processor) and `<|endoftext|>` = 2 (eos; also the document separator of the .txt
corpora, so a packed stream reads `<|bos|> story <|endoftext|> <|bos|> story <|endoftext|> ...`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..corpus import END_OF_TEXT, add_data_dir_argument
from .data import DataConfig, load_documents

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", END_OF_TEXT
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]  # ids 0, 1, 2, in this order
DEFAULT_VOCAB_SIZE = 8192
# Package data of amformers.train: the shipped tokenizer and the config whose training split it was trained on.
DEFAULT_TOKENIZER_DIR = Path(str(resources.files("amformers.train").joinpath("tokenizer")))
DEFAULT_CONFIG = Path(str(resources.files("amformers.train").joinpath("configs", "attn_stream-8m.yaml")))
# Where `main` writes a retrained tokenizer unless told: relative to the current directory, which in a checkout of
# the repository is the shipped tokenizer's folder.
DEFAULT_OUTPUT_DIR = Path("train") / "tokenizer"


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_frequency: int = 2,
    model_max_length: int = 2048,
    length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE (no unknown tokens, lossless decode) on `texts`."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must hold the 256 bytes and the special tokens, got {vocab_size}.")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=length)
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
    )


def load_tokenizer(name_or_path: str | Path | None = "default"):
    """The shipped tokenizer for "default"/None, else `AutoTokenizer.from_pretrained(name_or_path)`.

    Refuses tokenizers that packing and generation cannot use: without bos/eos/pad, or with shared ids.
    """
    path = DEFAULT_TOKENIZER_DIR if name_or_path in (None, "default") else Path(name_or_path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        hint = " Retrain it with `python -m amformers.train.tokenizer`." if path == DEFAULT_TOKENIZER_DIR else ""
        raise FileNotFoundError(f"no tokenizer files in {path}.{hint}")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(f"tokenizer {path} has no {', '.join(missing)} token; pretraining needs bos, eos and pad.")
    if len(set(ids.values())) != 3:
        raise ValueError(f"tokenizer {path} must give bos, eos and pad distinct ids, got {ids}.")
    return tokenizer


def _text_batches(dataset, batch_size: int = 1000) -> Iterator[list[str]]:
    for start in range(0, len(dataset), batch_size):
        yield dataset[start : start + batch_size]["text"]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m amformers.train.tokenizer",
        description="Train the byte-level BPE tokenizer on a pretraining config's training split.",
        epilog=(
            "examples:\n"
            "  python -m amformers.train.tokenizer\n"
            "  python -m amformers.train.tokenizer --config train/configs/attn_stream-8m.yaml --vocab_size 4096 "
            "--output_dir runs/tok4k\n"
            "\nThe first writes the shipped tokenizer's folder (train/tokenizer under the current directory)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="pretraining YAML whose `data` to train on")
    add_data_dir_argument(parser)  # overrides the config's data.root
    parser.add_argument("--cache_dir", default=None, help="datasets cache (default: the datasets default)")
    parser.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--min_frequency", type=int, default=2)
    parser.add_argument("--model_max_length", type=int, default=2048)
    parser.add_argument(
        "--output_dir", default=str(DEFAULT_OUTPUT_DIR), help="default: train/tokenizer under the current directory"
    )
    args = parser.parse_args(argv)

    with open(args.config, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle) or {}
    data_config = DataConfig.from_dict(raw.get("data", {}))
    if args.data_dir:
        data_config.root = args.data_dir
    if args.cache_dir:
        data_config.cache_dir = args.cache_dir

    documents = load_documents(data_config)["train"]
    characters = sum(len(t) for batch in _text_batches(documents) for t in batch)
    start = time.perf_counter()
    tokenizer = train_tokenizer(
        _text_batches(documents),
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        model_max_length=args.model_max_length,
        length=len(documents),
    )
    seconds = time.perf_counter() - start

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(output))
    sources = [{"path": s.path, "split": s.split, "clean": s.clean} for s in data_config.sources]
    info = {
        "vocab_size": len(tokenizer),
        "min_frequency": args.min_frequency,
        "special_tokens": {"pad": PAD_TOKEN, "bos": BOS_TOKEN, "eos": EOS_TOKEN},
        "trained_on": {"split": "train", "documents": len(documents), "characters": characters, "sources": sources},
        "training_seconds": round(seconds, 2),
        "command": " ".join(["python -m amformers.train.tokenizer", *(sys.argv[1:] if argv is None else argv)]),
    }
    (output / "training_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(
        f"trained a {len(tokenizer)}-token byte-level BPE on {len(documents)} documents "
        f"({characters / 1e6:.1f} M characters) in {seconds:.1f} s -> {output}"
    )
    return output


if __name__ == "__main__":
    main()
