"""Pretraining data: the `data` section of a config, the corpus cached through `datasets`, tokenization, packing
and the loaders.

What a document is (readers, Gutenberg cleaning, chunking, the content-hashed held-out split) is the corpus's
business, `amformers.corpus`; this module turns those documents into training blocks. Two cached stages, both
`datasets` Arrow tables under `cache_dir` (default: the `datasets` cache in the user's home, never the
repository), each keyed by a fingerprint of everything it depends on:

    files --amformers.corpus: read, clean, chunk, assign split--> documents {text, source, split}
    documents --shuffle(seed), tokenize (bos + text), append eos, concatenate, cut--> blocks {input_ids}

Then `build_loaders` deals the blocks in an order that depends only on (seed, epoch), so a resumed run sees the
same batches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, Sequence, Value, concatenate_datasets
from datasets.fingerprint import Hasher

from .. import corpus
from ..corpus import DataSource, data_dir, resolve_source_files, source_documents

# Documents tokenized and packed per `map` batch; the tail of each batch (< one block) is dropped,
# which costs under 0.1% of the tokens at this size.
PACK_BATCH_DOCUMENTS = 2000

DOCUMENT_FEATURES = Features({"text": Value("string"), "source": Value("string"), "split": Value("string")})

# Any edit to this file or to the corpus reader changes the fingerprints, so caches built by older code are never
# reused.
_CODE_VERSION = hashlib.sha256(Path(__file__).read_bytes() + Path(corpus.__file__).read_bytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class DataConfig:
    sources: list[DataSource]
    root: str | None = None
    block_size: int = 256
    cache_dir: str | None = None
    num_proc: int | None = None
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, raw: dict) -> DataConfig:
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)} - {"extra"}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown key(s) in the `data` section: {sorted(unknown)}; known keys: {sorted(known)}.")
        sources = raw.pop("sources", None)
        if not sources:
            raise ValueError("the `data` section needs a non-empty `sources` list.")
        source_keys = {f.name for f in fields(DataSource)}
        parsed = []
        for item in sources:
            if isinstance(item, str):
                item = {"path": item}
            bad = set(item) - source_keys
            if bad:
                raise ValueError(f"unknown key(s) {sorted(bad)} in data source {item}; known: {sorted(source_keys)}.")
            parsed.append(DataSource(**item))
        config = cls(sources=parsed, **raw)
        if config.block_size < 2:
            raise ValueError(f"`data.block_size` must be at least 2, got {config.block_size}.")
        return config

    def resolved_root(self) -> Path:
        """`root` if the config (or --data-dir) sets it, else the corpus's data folder (see `amformers.corpus`)."""
        return data_dir(self.root)


def _generate_documents(files: list[str], source: dict, code_version: str) -> Iterator[dict]:
    """`datasets` generator (picklable arguments): the corpus documents of one source, split decided.
    `code_version` is only there to key the cache."""
    yield from source_documents(DataSource(**source), [Path(f) for f in files])


def load_source(source: DataSource, root: Path, cache_dir: str | None = None, num_proc: int | None = None) -> Dataset:
    """All documents of one source as a cached `datasets.Dataset` with columns text, source, split."""
    files = resolve_source_files(source, root)
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    fingerprint = Hasher.hash({"files": stats, "source": asdict(source), "code": _CODE_VERSION})
    shards = num_proc if (num_proc and num_proc > 1 and source.max_documents is None and len(files) > 1) else None
    return Dataset.from_generator(
        _generate_documents,
        features=DOCUMENT_FEATURES,
        cache_dir=cache_dir,
        gen_kwargs={"files": [str(f) for f in files], "source": asdict(source), "code_version": _CODE_VERSION},
        num_proc=shards,
        fingerprint=fingerprint,
    )


def load_documents(config: DataConfig) -> DatasetDict:
    """The document mix as {"train", "validation"}, in source order (shuffling happens at packing)."""
    root = config.resolved_root()
    parts = [load_source(s, root, config.cache_dir, config.num_proc) for s in config.sources]
    everything = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    splits = {}
    for split in ("train", "validation"):
        splits[split] = everything.filter(
            lambda values, wanted=split: [value == wanted for value in values],
            input_columns="split",
            batched=True,
            desc=f"select {split}",
        )
    if len(splits["train"]) == 0:
        raise ValueError("the data mix has no training documents: mark at least one source `split: train`.")
    return DatasetDict(splits)


# ----------------------------------------------------------------------------------------------------
# Tokenization and packing


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the tokenizer would produce different ids (vocab, merges, special tokens, template)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError("packing needs a fast (tokenizers-backed) tokenizer.")
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()[:16]


def _tokenize_and_pack(batch: dict, tokenizer, block_size: int) -> dict:
    ids = tokenizer(batch["text"], add_special_tokens=True, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=np.int32)
    ends = np.cumsum(lengths)
    for document, end, length in zip(ids, ends, lengths):
        flat[end - length : end - 1] = document
        flat[end - 1] = eos
    usable = (len(flat) // block_size) * block_size
    return {"input_ids": flat[:usable].reshape(-1, block_size)}


def pack_documents(
    documents: Dataset,
    tokenizer,
    block_size: int,
    seed: int | None = None,
    num_proc: int | None = None,
) -> Dataset:
    """Documents (bos + text + eos) concatenated and cut into `block_size` blocks.

    With `seed`, documents are shuffled first so every block mixes sources; the result is the same for
    the same documents, tokenizer, block size and seed, and is cached by `datasets`.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token, which packing uses to join documents.")
    if seed is not None:
        documents = documents.shuffle(seed=seed)
    fingerprint = Hasher.hash(
        [documents._fingerprint, tokenizer_fingerprint(tokenizer), block_size, seed, _CODE_VERSION]
    )
    packed = documents.map(
        _tokenize_and_pack,
        batched=True,
        batch_size=PACK_BATCH_DOCUMENTS,
        remove_columns=documents.column_names,
        fn_kwargs={"tokenizer": tokenizer, "block_size": block_size},
        features=Features({"input_ids": Sequence(Value("int32"), length=block_size)}),
        new_fingerprint=fingerprint,
        num_proc=num_proc,
        desc=f"tokenize and pack into blocks of {block_size}",
    )
    return packed.with_format("numpy")


def build_datasets(config: DataConfig, tokenizer, seed: int) -> tuple[Dataset, Dataset | None]:
    """(train blocks, validation blocks or None): the whole data path of a pretraining run."""
    documents = load_documents(config)
    train = pack_documents(documents["train"], tokenizer, config.block_size, seed=seed, num_proc=config.num_proc)
    if len(train) == 0:
        raise ValueError(
            f"the training documents hold fewer tokens than one block of {config.block_size}: add data or "
            "lower `data.block_size`."
        )
    valid = None
    if len(documents["validation"]):
        valid = pack_documents(documents["validation"], tokenizer, config.block_size, num_proc=config.num_proc)
        if len(valid) == 0:
            valid = None
    return train, valid


# ----------------------------------------------------------------------------------------------------
# Batching


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A permutation of the blocks that depends only on (seed, epoch), so a resumed run sees the same order."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


def collate_blocks(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Blocks to a batch; the labels are the inputs (the model shifts them)."""
    input_ids = torch.from_numpy(np.stack([row["input_ids"] for row in rows])).long()
    return {"input_ids": input_ids, "labels": input_ids}


def dataset_summary(dataset: Dataset | None) -> dict:
    if dataset is None:
        return {"blocks": 0, "tokens": 0}
    block_size = len(dataset[0]["input_ids"]) if len(dataset) else 0
    return {"blocks": len(dataset), "tokens": len(dataset) * block_size}


def build_loaders(
    train_blocks: Dataset,
    valid_blocks: Dataset | None,
    batch_size: int,
    seed: int,
    eval_batch_size: int | None = None,
    num_workers: int = 0,
):
    """(train loader, its sampler, validation loader or None), before `Accelerator.prepare`: training blocks in
    an order fixed by (seed, epoch), full batches only; validation blocks in order."""
    sampler = EpochShuffleSampler(len(train_blocks), seed)
    train_loader = torch.utils.data.DataLoader(
        train_blocks,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_blocks,
        num_workers=num_workers,
    )
    valid_loader = None
    if valid_blocks is not None:
        valid_loader = torch.utils.data.DataLoader(
            valid_blocks, batch_size=eval_batch_size or batch_size, shuffle=False, collate_fn=collate_blocks
        )
    return train_loader, sampler, valid_loader


def micro_batches(accelerator, loader, sampler: EpochShuffleSampler, start: int) -> Iterator[dict]:
    """Micro-batches of a prepared loader forever, epoch after epoch, after the first `start` ones (per process):
    a resumed run continues exactly where the interrupted one stopped."""
    per_epoch = len(loader)
    epoch, skip = divmod(start, per_epoch)
    while True:
        current = accelerator.skip_first_batches(loader, skip) if skip else loader
        # DataLoaderShard re-seeds the sampler from its own epoch counter at each `iter`; pin both.
        current.set_epoch(epoch)
        sampler.set_epoch(epoch)
        yield from current
        epoch, skip = epoch + 1, 0
