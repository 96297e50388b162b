"""Perplexity and bits per byte on held-out text.

Sources:
- tinystories-valid: TinyStories `valid.txt` from `../shared/data/tinystories/` (stories separated by
  `<|endoftext|>` lines, each scored as its own document from the prefix token);
- pd-stories-holdout: the held-out book text of the pretraining mix, i.e. the validation chunks that
  `amformers.train.data` carves out of `../shared/data/pd-stories/` (Gutenberg-cleaned ~4000-character chunks,
  1% chosen by text hash, as in train/configs/*-8m.yaml); skipped with `--no-heldout-books`;
- any book given with `--book FILE` (one long document, scored with overlapping windows).
For each source:

    nll     = summed negative log-likelihood of every text token (nats), each predicted once
    ppl     = exp(nll / tokens)
    bpb     = nll / (ln 2 * UTF-8 bytes of the text)

Bits per byte do not depend on the tokenizer, so they compare models with different vocabularies.
"""

import math
import time
from pathlib import Path

from .common import DATA_ROOT, document_nll, load_model, save_result
from .results import format_table

TINYSTORIES_VALID = DATA_ROOT / "tinystories" / "valid.txt"
SEPARATOR = "<|endoftext|>"


def read_stories(path: str | Path, limit: int | None = None) -> list[str]:
    text = Path(path).read_text(encoding="utf-8")
    stories = [s.strip() for s in text.split(SEPARATOR) if s.strip()]
    return stories[:limit] if limit else stories


def heldout_book_chunks(chunk_chars: int = 4000, valid_fraction: float = 0.01, limit: int | None = None) -> list[str]:
    """The pd-stories validation documents exactly as the pretraining data pipeline splits them."""
    from amformers.train.data import DataSource, load_source

    source = DataSource(
        path="pd-stories", split="holdout", name="pd-stories", clean="gutenberg", chunk_chars=chunk_chars,
        valid_fraction=valid_fraction,
    )  # fmt: skip
    documents = load_source(source, DATA_ROOT)
    texts = [row["text"] for row in documents if row["split"] == "validation"]
    return texts[:limit] if limit else texts


def evaluate_documents(model, tokenizer, documents: list[str], max_length=None, stride=None) -> dict:
    nll = tokens = 0.0
    num_bytes = 0
    for document in documents:
        doc_nll, doc_tokens = document_nll(model, tokenizer, document, max_length, stride)
        nll += doc_nll
        tokens += doc_tokens
        num_bytes += len(document.encode("utf-8"))
    return metrics(nll, int(tokens), num_bytes, len(documents))


def metrics(nll: float, tokens: int, num_bytes: int, documents: int) -> dict:
    return {
        "documents": documents,
        "tokens": tokens,
        "bytes": num_bytes,
        "nll_nats": nll,
        "loss": nll / tokens,
        "perplexity": math.exp(nll / tokens),
        "bits_per_byte": nll / (math.log(2) * num_bytes),
        "bytes_per_token": num_bytes / tokens,
    }


def main(args) -> dict:
    started = time.time()
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
    sources = {}
    if Path(args.tinystories).is_file():
        sources["tinystories-valid"] = (
            str(Path(args.tinystories).resolve()),
            read_stories(args.tinystories, args.limit),
        )
    else:
        print(f"{args.tinystories} not found: skipping TinyStories.")
    if args.heldout_books and (DATA_ROOT / "pd-stories").is_dir():
        try:
            sources["pd-stories-holdout"] = (str(DATA_ROOT / "pd-stories"), heldout_book_chunks(limit=args.limit))
        except ImportError as error:  # the training package is optional for evaluation
            print(f"amformers.train.data unavailable ({error}): skipping the held-out book text.")
    for book in args.book or []:
        text = Path(book).read_text(encoding="utf-8")
        sources[f"book:{Path(book).stem}"] = (
            str(Path(book).resolve()),
            [text[: args.max_chars] if args.max_chars else text],
        )
    results = {}
    for name, (path, documents) in sources.items():
        results[name] = {"path": path, **evaluate_documents(model, tokenizer, documents, args.max_length, args.stride)}
    print(
        format_table(
            [{"source": k, **v} for k, v in results.items()],
            ["source", "documents", "tokens", "loss", "perplexity", "bits_per_byte"],
        )
    )
    config = {
        "limit_documents": args.limit,
        "max_chars": args.max_chars,
        "max_length": args.max_length,
        "stride": args.stride,
    }
    save_result(
        args, "perplexity", settings=config, metrics=headline_metrics(results),
        tables={"sources": [{"source": name, **values} for name, values in results.items()]}, model=model,
        started=started,
    )  # fmt: skip
    return results


def headline_metrics(results: dict) -> dict:
    """The declared perplexity metrics of the TinyStories and held-out book sources (other books: table only)."""
    metrics = {}
    if "tinystories-valid" in results:
        metrics["tinystories_valid_perplexity"] = results["tinystories-valid"]["perplexity"]
        metrics["tinystories_valid_bits_per_byte"] = results["tinystories-valid"]["bits_per_byte"]
    if "pd-stories-holdout" in results:
        metrics["heldout_books_perplexity"] = results["pd-stories-holdout"]["perplexity"]
        metrics["heldout_books_bits_per_byte"] = results["pd-stories-holdout"]["bits_per_byte"]
    return metrics


def add_arguments(parser):
    parser.add_argument("--tinystories", default=str(TINYSTORIES_VALID), help="TinyStories valid.txt")
    parser.add_argument("--book", action="append", help="a held-out book (plain text); repeatable")
    parser.add_argument(
        "--no-heldout-books", dest="heldout_books", action="store_false", help="skip the pd-stories held-out chunks"
    )
    parser.add_argument("--max-chars", type=int, help="score only the first N characters of each book")
    parser.add_argument("--max-length", type=int, help="window length (default: max_position_embeddings)")
    parser.add_argument("--stride", type=int, help="window advance for long texts (default: half the window)")
