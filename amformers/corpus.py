"""The text corpus that training and evaluation both read: where it lives, how it is read, cleaned and split.

This module owns, once for the whole package:
- the data folder: a `--data-dir` flag when the command has one, else the `AMFORMERS_DATA_DIR` environment
  variable, else `../shared/data` relative to the current directory (this project's layout: the data folder
  beside the repository checkout, commands run from the checkout);
- the document separator `<|endoftext|>` and the readers of the sources (`.txt`, JSON Lines, folders, globs);
- the cleaning of Project Gutenberg books (`clean: gutenberg`) and their chunking at paragraph boundaries;
- the held-out split: a document is validation data when the SHA-256 of its whitespace-normalised text falls in
  `valid_fraction` (so it never depends on file order, seeds or chunk boundaries elsewhere), and the book source
  of the default mix, `PD_STORIES` (chunks of `BOOK_CHUNK_CHARS`, `VALID_FRACTION` held out), is declared here;
- the rule that benchmark folders (`BENCHMARK_FOLDERS`) are never a corpus source.

It needs only the standard library: training (`amformers.train.data`, which caches, tokenizes and packs these
documents) and evaluation (`amformers.eval.perplexity`, which scores the held-out books) both import it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "AMFORMERS_DATA_DIR"
DEFAULT_DATA_DIR = Path("..") / "shared" / "data"

END_OF_TEXT = "<|endoftext|>"
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".json")
SPLITS = ("train", "validation", "holdout")
CLEANERS = ("none", "gutenberg")
# Folders of the data folder that hold benchmark sets (bAbI, BLiMP): a corpus never includes them, so no model
# trains or validates on the data it is later scored on.
BENCHMARK_FOLDERS = ("babi", "blimp")
# The held-out split of the default mix's books: ~4000-character chunks, 1% of them chosen by content hash.
BOOK_CHUNK_CHARS = 4000
VALID_FRACTION = 0.01


def data_dir(path: str | Path | None = None) -> Path:
    """The data folder: `path` (a `--data-dir` flag) if given, else $AMFORMERS_DATA_DIR, else ../shared/data."""
    if path:
        return Path(os.path.expandvars(str(path))).expanduser()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.path.expandvars(os.environ[DATA_DIR_ENV])).expanduser()
    return DEFAULT_DATA_DIR


def add_data_dir_argument(parser) -> None:
    """The `--data-dir` flag of a command that reads the corpus (`--data_dir`, `--data_root`: older spellings),
    stored as `data_dir`; pass it to `data_dir()` (or as a config's `data.root`)."""
    parser.add_argument(
        "--data-dir",
        "--data_dir",
        "--data_root",
        dest="data_dir",
        default=None,
        help=f"the data folder the sources are relative to (default: ${DATA_DIR_ENV}, else ../shared/data)",
    )


# ----------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class DataSource:
    """One corpus in a mix. `path` is a file, folder or glob, absolute or relative to the data folder.

    `split` is train, validation (the whole source) or holdout (a content-hashed `valid_fraction` of its
    documents is validation, the rest train); `clean: gutenberg` and `chunk_chars` prepare books.
    """

    path: str
    split: str = "train"
    name: str | None = None
    clean: str = "none"
    chunk_chars: int | None = None
    valid_fraction: float = VALID_FRACTION
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


# The public-domain books of the default mix (train/configs/*.yaml list this same source).
PD_STORIES = DataSource(
    path="pd-stories", split="holdout", name="pd-stories", clean="gutenberg", chunk_chars=BOOK_CHUNK_CHARS
)


def resolve_source_files(source: DataSource, root: Path) -> list[Path]:
    """The files a source names, sorted, so that the document order is the same on every machine."""
    path = Path(os.path.expandvars(source.path)).expanduser()
    if not path.is_absolute():
        if not root.is_dir():
            raise FileNotFoundError(
                f"data source {source.path!r} is relative to the data folder {root}, which does not exist. Set "
                f"`data.root` in the config, pass --data-dir, or set {DATA_DIR_ENV}."
            )
        path = root / path
    lowered = {part.lower() for part in path.parts}
    for folder in BENCHMARK_FOLDERS:
        if folder in lowered:
            raise ValueError(
                f"data source {path} is inside {folder}/, which is benchmark data: training or validating on it "
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


def text_file_documents(path: Path) -> Iterator[str]:
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


def jsonl_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of a JSON Lines file: the `text_field` of each record."""
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


def source_documents(source: DataSource, files: list[Path]) -> Iterator[dict]:
    """The documents of `source` read from its `files`, cleaned, chunked, with their split decided:
    {"text", "source" (the source's label), "split" ("train" or "validation")}, in file order."""
    count = 0
    for path in map(Path, files):
        if path.suffix.lower() in JSONL_SUFFIXES:
            raw_documents = jsonl_documents(path, source.text_field)
        else:
            raw_documents = text_file_documents(path)
        for raw in raw_documents:
            text = clean_gutenberg(raw) if source.clean == "gutenberg" else raw.strip()
            pieces = chunk_document(text, source.chunk_chars) if source.chunk_chars else [text]
            for piece in pieces:
                piece = piece.strip()
                if not piece:
                    continue
                split = source.split
                if split == "holdout":
                    split = "validation" if is_heldout(piece, source.valid_fraction) else "train"
                yield {"text": piece, "source": source.label, "split": split}
                count += 1
                if source.max_documents is not None and count >= source.max_documents:
                    return


def validation_texts(source: DataSource = PD_STORIES, root: str | Path | None = None) -> list[str]:
    """The validation documents of `source` (default: the default mix's held-out books) under the data folder
    `root` (see `data_dir`), exactly as the pretraining data pipeline splits them."""
    files = resolve_source_files(source, data_dir(root))
    return [d["text"] for d in source_documents(source, files) if d["split"] == "validation"]
