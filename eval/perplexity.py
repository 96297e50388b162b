"""Perplexity and bits per byte on held-out text.

Sources (under the data folder of `amformers.corpus`: $AMFORMERS_DATA_DIR, else ../shared/data):
- tinystories-valid: TinyStories `tinystories/valid.txt` (stories separated by `<|endoftext|>` lines, each
  scored as its own document from the prefix token);
- pd-stories-holdout: the held-out book text of the pretraining mix, i.e. the validation chunks of the corpus's
  book source `amformers.corpus.PD_STORIES` (Gutenberg-cleaned chunks chosen by text hash, the split training
  uses); skipped with `--no-heldout-books`;
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

from .. import corpus
from .common import document_nll, load_model, progress, save_result
from .results import format_table

TINYSTORIES_VALID = corpus.data_dir() / "tinystories" / "valid.txt"


def read_stories(path: str | Path, limit: int | None = None) -> list[str]:
    """The stories of a `<|endoftext|>`-separated text file, stripped, empty ones dropped."""
    stories = [s.strip() for s in corpus.text_file_documents(Path(path)) if s.strip()]
    return stories[:limit] if limit else stories


def heldout_book_chunks(limit: int | None = None) -> list[str]:
    """The pd-stories validation documents exactly as the pretraining data pipeline splits them."""
    texts = corpus.validation_texts(corpus.PD_STORIES)
    return texts[:limit] if limit else texts


def evaluate_documents(model, tokenizer, documents: list[str], max_length=None, stride=None, desc=None) -> dict:
    """Summed NLL, tokens and bytes of `documents`, each scored on its own (`desc`: a progress bar over them)."""
    nll = tokens = 0.0
    num_bytes = 0
    for document in progress(documents, desc=desc, unit="doc"):
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
    books = corpus.data_dir() / corpus.PD_STORIES.path
    if args.heldout_books and books.is_dir():
        sources["pd-stories-holdout"] = (str(books.resolve()), heldout_book_chunks(limit=args.limit))
    for book in args.book or []:
        text = Path(book).read_text(encoding="utf-8")
        sources[f"book:{Path(book).stem}"] = (
            str(Path(book).resolve()),
            [text[: args.max_chars] if args.max_chars else text],
        )
    results = {}
    for name, (path, documents) in sources.items():
        scored = evaluate_documents(model, tokenizer, documents, args.max_length, args.stride, f"perplexity {name}")
        results[name] = {"path": path, **scored}
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
