"""Pretraining data: corpus cleaning, document loading through `datasets`, tokenization and packing.

Two cached stages, both `datasets` Arrow tables under `cache_dir` (default: the `datasets` cache in the
user's home, never the repository), each keyed by a fingerprint of everything it depends on:

    files --read, split on <|endoftext|>, clean, chunk, assign split--> documents {text, source, split}
    documents --shuffle(seed), tokenize (bos + text), append eos, concatenate, cut--> blocks {input_ids}

A source is a `.txt` file (documents separated by `<|endoftext|>`, or the whole file is one document), a
JSON Lines file with a text field, or a folder or glob of such files. So the full TinyStories, or any
corpus in those formats, trains by pointing a config at it. Gutenberg books get `clean: gutenberg`
(unwrap hard-wrapped paragraphs, drop tables of contents and `[Illustration]` tags) and `chunk_chars`
(cut into documents of about that many characters at paragraph boundaries). Validation documents are
either a whole source (`split: validation`) or a deterministic hash-chosen fraction of one
(`split: holdout`), so the split never depends on file order, seeds or chunk boundaries elsewhere.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, Sequence, Value, concatenate_datasets
from datasets.fingerprint import Hasher

END_OF_TEXT = "<|endoftext|>"
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".json")
SPLITS = ("train", "validation", "holdout")
CLEANERS = ("none", "gutenberg")
# Folders of ../shared/data that hold evaluation sets: training on them would leak the benchmarks.
EVAL_ONLY_FOLDERS = ("babi", "blimp")
# Documents tokenized and packed per `map` batch; the tail of each batch (< one block) is dropped,
# which costs under 0.1% of the tokens at this size.
PACK_BATCH_DOCUMENTS = 2000

DOCUMENT_FEATURES = Features({"text": Value("string"), "source": Value("string"), "split": Value("string")})

# Any edit to this file changes the fingerprints, so caches built by older code are never reused.
_CODE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def default_data_root() -> Path:
    """`$AMFORMERS_DATA_DIR`, else `../shared/data` beside the repository checkout."""
    if os.environ.get("AMFORMERS_DATA_DIR"):
        return Path(os.environ["AMFORMERS_DATA_DIR"]).expanduser()
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class DataSource:
    """One corpus in the mix. `path` is a file, folder or glob, absolute or relative to the data root."""

    path: str
    split: str = "train"
    name: str | None = None
    clean: str = "none"
    chunk_chars: int | None = None
    valid_fraction: float = 0.01
    text_field: str = "text"
    max_documents: int | None = None

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"data source {self.path!r}: `split` must be one of {SPLITS}, got {self.split!r}.")
        if self.clean not in CLEANERS:
            raise ValueError(f"data source {self.path!r}: `clean` must be one of {CLEANERS}, got {self.clean!r}.")
        if self.chunk_chars is not None and self.chunk_chars < 1:
            raise ValueError(f"data source {self.path!r}: `chunk_chars` must be positive, got {self.chunk_chars}.")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(
                f"data source {self.path!r}: `valid_fraction` must be in (0, 1), got {self.valid_fraction}."
            )
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"data source {self.path!r}: `max_documents` must be positive.")

    @property
    def label(self) -> str:
        return self.name or Path(self.path.rstrip("/*")).stem or self.path


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
        return Path(os.path.expandvars(self.root)).expanduser() if self.root else default_data_root()


def resolve_source_files(source: DataSource, root: Path) -> list[Path]:
    """The files a source names, sorted, so that the document order is the same on every machine."""
    path = Path(os.path.expandvars(source.path)).expanduser()
    if not path.is_absolute():
        if not root.is_dir():
            raise FileNotFoundError(
                f"data source {source.path!r} is relative to the data root {root}, which does not exist. Set "
                "`data.root` in the config, pass --data_root, or set AMFORMERS_DATA_DIR."
            )
        path = root / path
    lowered = {part.lower() for part in path.parts}
    for folder in EVAL_ONLY_FOLDERS:
        if folder in lowered:
            raise ValueError(
                f"data source {path} is inside {folder}/, which is evaluation data: training or validating on it "
                "would contaminate the benchmarks."
            )
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    files = [f for f in files if f.suffix.lower() in suffixes]
    if not files:
        raise FileNotFoundError(f"data source {path} matches no .txt/.jsonl/.json file.")
    return files


# ----------------------------------------------------------------------------------------------------
# Cleaning and chunking

_ILLUSTRATION = re.compile(r"\[Illustration[^\]]*\]", re.IGNORECASE)
_ITALICS = re.compile(r"(?<![\w_])_(\S(?:[^_\n]*?\S)?)_(?![\w_])")
_BLANK_LINES = re.compile(r"\n[ \t]*\n")
_CONTENTS_HEADING = re.compile(
    r"^\s*(?:table of )?contents[.:]?\s*$"
    r"|^\s*(?:list of )?(?:illustrations|chapters)[.:]?\s*$"
    r"|^\s*a list of the [\w ]+\s*$",
    re.IGNORECASE,
)
_TABLE_LINE = re.compile(r"\S\s{3,}\S|(?:\s\.){3,}|\.{4,}|\s{2,}\d+\s*$")
_SENTENCE_END = re.compile(r"[.!?][\"'’”)]?(\s|$)")
_ENDS_LIKE_TEXT = re.compile(r"[.!?,;:—-][\"'’”)\]]*$")
# This many title-like one-line paragraphs in a row are a list of chapters or stories, not text.
MIN_TITLE_RUN = 6


def _is_table(lines: list[str]) -> bool:
    """Lines laid out in columns (dot leaders, page numbers, wide gaps): a table of contents or an index."""
    if not any("  " in line.strip() or ". ." in line or "...." in line for line in lines):
        return False  # fast path: ordinary prose has none of a table's gaps or dot leaders
    hits = sum(bool(_TABLE_LINE.search(line)) for line in lines if line.strip())
    return hits * 2 >= max(1, sum(bool(line.strip()) for line in lines))


def _is_verse(lines: list[str]) -> bool:
    """Every line indented: verse or a letter's address block, whose line breaks carry meaning."""
    return all(line.startswith("  ") for line in lines if line.strip())


def _is_prose(paragraph: str, lines: list[str]) -> bool:
    """Running text: long, with a sentence end, mostly lower case, not laid out as a table or a list."""
    if len(paragraph) < 60 or _SENTENCE_END.search(paragraph) is None:
        return False
    letters = [c for c in paragraph if c.isalpha()]
    if sum(c.islower() for c in letters) < 0.5 * len(letters):
        return False
    indented = sum(line[:1].isspace() for line in lines)
    return indented * 2 < len(lines) and not _is_table(lines)


def clean_gutenberg(text: str) -> str:
    """Project Gutenberg plain text to clean paragraphs, one per line.

    Hard-wrapped lines are joined (verse keeps its line breaks), `[Illustration...]` tags, `_italic_`
    markers and tables (contents, lists of illustrations, anything with dot leaders or page numbers)
    are removed. Everything from a "Contents" heading up to the first real prose paragraph is dropped.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _ILLUSTRATION.sub("", text)
    paragraphs = []
    skipping_contents = False
    for block in _BLANK_LINES.split(text):
        lines = [line.rstrip() for line in block.split("\n") if line.strip()]
        if not lines:
            continue
        joined = " ".join(line.strip() for line in lines)
        if _CONTENTS_HEADING.match(joined):
            skipping_contents = True
            continue
        if skipping_contents:
            if not _is_prose(joined, lines):
                continue
            skipping_contents = False
        if _is_table(lines):
            continue
        if _is_verse(lines) and len(lines) > 1:
            paragraph = "\n".join(" ".join(line.split()) for line in lines)
        else:
            paragraph = " ".join(joined.split())
        paragraph = _ITALICS.sub(r"\1", paragraph)
        if paragraph:
            paragraphs.append(paragraph)
    return "\n".join(_drop_title_runs(paragraphs))


def _is_title_like(paragraph: str) -> bool:
    """(Nearly) every line short and unpunctuated, like chapter titles or title-page lines."""
    lines = paragraph.split("\n")
    titles = sum(len(line) < 80 and not _ENDS_LIKE_TEXT.search(line) for line in lines)
    return titles >= 0.8 * len(lines)


def _drop_title_runs(paragraphs: list[str]) -> list[str]:
    """Drop runs of MIN_TITLE_RUN or more title-like lines: contents without a heading, title pages."""
    kept, run, run_lines = [], [], 0
    for paragraph in paragraphs + [None]:
        if paragraph is not None and _is_title_like(paragraph):
            run.append(paragraph)
            run_lines += paragraph.count("\n") + 1
            continue
        if run_lines < MIN_TITLE_RUN:
            kept.extend(run)
        run, run_lines = [], 0
        if paragraph is not None:
            kept.append(paragraph)
    return kept


def chunk_document(text: str, chunk_chars: int) -> list[str]:
    """Cut at paragraph (line) boundaries into pieces of at least `chunk_chars` characters.

    A short tail (under a quarter of `chunk_chars`) joins the previous piece rather than standing alone.
    """
    chunks, current, size = [], [], 0
    for paragraph in text.split("\n"):
        if not paragraph.strip():
            continue
        size += len(paragraph) + (1 if current else 0)  # the joined length, newlines included
        current.append(paragraph)
        if size >= chunk_chars:
            chunks.append("\n".join(current))
            current, size = [], 0
    if current:
        if chunks and size < chunk_chars // 4:
            chunks[-1] = chunks[-1] + "\n" + "\n".join(current)
        else:
            chunks.append("\n".join(current))
    return chunks


def is_heldout(text: str, fraction: float) -> bool:
    """Deterministic validation membership from the whitespace-normalised text's SHA-256."""
    digest = hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()
    return int(digest, 16) % 1_000_000 < round(fraction * 1_000_000)


# ----------------------------------------------------------------------------------------------------
# Reading files


def _text_file_documents(path: Path) -> Iterator[str]:
    """Documents of a .txt file: split on <|endoftext|> when present, else the whole file."""
    buffer: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if END_OF_TEXT not in line:
                buffer.append(line)
                continue
            *complete, rest = line.split(END_OF_TEXT)
            for piece in complete:
                buffer.append(piece)
                yield "".join(buffer)
                buffer = []
            buffer.append(rest)
    yield "".join(buffer)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not valid JSON Lines: {error}") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{path}:{number} has no {text_field!r} field (set `text_field` for this source).")
            yield str(record[text_field])


def _generate_documents(files: list[str], source: dict, code_version: str) -> Iterator[dict]:
    """`datasets` generator: one row per document, with its split already decided."""
    spec = DataSource(**source)
    count = 0
    for file in files:
        path = Path(file)
        if path.suffix.lower() in JSONL_SUFFIXES:
            raw_documents = _jsonl_documents(path, spec.text_field)
        else:
            raw_documents = _text_file_documents(path)
        for raw in raw_documents:
            text = clean_gutenberg(raw) if spec.clean == "gutenberg" else raw.strip()
            pieces = chunk_document(text, spec.chunk_chars) if spec.chunk_chars else [text]
            for piece in pieces:
                piece = piece.strip()
                if not piece:
                    continue
                split = spec.split
                if split == "holdout":
                    split = "validation" if is_heldout(piece, spec.valid_fraction) else "train"
                yield {"text": piece, "source": spec.label, "split": split}
                count += 1
                if spec.max_documents is not None and count >= spec.max_documents:
                    return


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
