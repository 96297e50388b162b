"""The corpus (amformers.corpus: reading, Gutenberg cleaning, the held-out split) and the pretraining data path
(document loading through `datasets`, packing, loaders), and the tokenizer."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from amformers import corpus as C
from amformers.train import data as D
from amformers.train.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]

GUTENBERG_SAMPLE = """THE LITTLE BOOK

By A. Writer



CONTENTS

     I.  THE BEGINNING . . . . . . . .  1
     II. THE MIDDLE  . . . . . . . . .  9
     III. THE END  . . . . . . . . . . 17



[Illustration: A fox
   sitting under a tree]

CHAPTER I

It was a _very_ cold morning when the little fox
left the den and walked down to the river, where
the ice had begun to crack.

     The river sings a song,
     The ice is thin and long.

"Come back!" called his mother, but the fox did
not hear her.
"""


def synthetic_stories(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    names = ["Lily", "Tom", "Ben", "Sue", "Max", "Mia", "Sam", "Anna"]
    things = ["ball", "cake", "kite", "book", "hat", "apple", "boat", "flower"]
    places = ["park", "garden", "beach", "school", "forest", "house"]
    stories = []
    for _ in range(count):
        a, b = rng.sample(names, 2)
        sentences = [
            f"Once upon a time, {a} went to the {rng.choice(places)}.",
            f"{a} saw a {rng.choice(['big', 'small', 'red', 'shiny'])} {rng.choice(things)}.",
            f'{b} said, "Can I play with the {rng.choice(things)} too?"',
            f"They played all day and were very happy. {a} smiled at {b}.",
        ]
        stories.append("\n".join(sentences[: rng.randint(2, 4)]))
    return stories


def write_stories(path: Path, stories: list[str]) -> Path:
    path.write_text("".join(f"{story}\n{C.END_OF_TEXT}\n" for story in stories), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def small_tokenizer():
    return train_tokenizer(synthetic_stories(300) + [GUTENBERG_SAMPLE], vocab_size=320, min_frequency=1)


# -- cleaning and splitting ---------------------------------------------------------------------------


def test_clean_gutenberg_unwraps_and_drops_front_matter():
    cleaned = C.clean_gutenberg(GUTENBERG_SAMPLE)
    lines = cleaned.split("\n")
    assert "Illustration" not in cleaned and "fox\n   sitting" not in cleaned
    assert "CONTENTS" not in cleaned and "THE MIDDLE" not in cleaned and ". . ." not in cleaned
    assert "_" not in cleaned  # italics markers removed, the word kept
    assert (
        "It was a very cold morning when the little fox left the den and walked down to the river, where the ice "
        "had begun to crack." in lines
    )
    # verse keeps its line breaks (without the indentation); dialogue lines are joined paragraphs
    assert "The river sings a song,\nThe ice is thin and long." in cleaned
    assert '"Come back!" called his mother, but the fox did not hear her.' in lines
    assert lines[0] == "THE LITTLE BOOK"


def test_clean_gutenberg_drops_title_runs_but_keeps_short_dialogue():
    contents = "\n\n".join(f"     THE TALE OF NUMBER {i}" for i in range(8))
    dialogue = "\n\n".join(['"Yes."', '"No."', '"Why not?"', '"Because."', '"Oh!"', '"Well, then."'])
    cleaned = C.clean_gutenberg(f"{contents}\n\n{dialogue}\n")
    assert "TALE OF NUMBER" not in cleaned
    assert cleaned.split("\n") == ['"Yes."', '"No."', '"Why not?"', '"Because."', '"Oh!"', '"Well, then."']


def test_chunk_document_cuts_at_paragraphs_and_loses_nothing():
    paragraphs = [("word " * random.Random(i).randint(5, 60)).strip() for i in range(200)]
    text = "\n".join(paragraphs)
    chunks = C.chunk_document(text, 1000)
    assert "\n".join(chunks) == text
    assert all(len(chunk) >= 1000 for chunk in chunks[:-1])
    assert len(chunks[-1]) >= 250  # a short tail joins the previous chunk
    assert C.chunk_document("short", 1000) == ["short"]


def test_heldout_is_content_hashed_and_near_the_fraction():
    texts = [f"story number {i} about a cat" for i in range(20000)]
    chosen = [t for t in texts if C.is_heldout(t, 0.01)]
    assert 150 < len(chosen) < 250
    assert C.is_heldout("a  cat\nsat", 0.5) == C.is_heldout("a cat sat", 0.5)  # whitespace-normalised
    assert chosen == [t for t in texts if C.is_heldout(t, 0.01)]


def test_text_file_documents_split_on_end_of_text(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(f"one\ntwo\n{C.END_OF_TEXT}\nthree{C.END_OF_TEXT}four\n{C.END_OF_TEXT}\n", encoding="utf-8")
    docs = [d.strip() for d in C.text_file_documents(path) if d.strip()]
    assert docs == ["one\ntwo", "three", "four"]
    whole = tmp_path / "b.txt"
    whole.write_text("a book\nwith lines\n", encoding="utf-8")
    assert [d.strip() for d in C.text_file_documents(whole)] == ["a book\nwith lines"]


# -- loading through datasets -------------------------------------------------------------------------


def _mixed_corpus(root: Path) -> D.DataConfig:
    stories = synthetic_stories(120)
    write_stories(root / "stories.txt", stories[:100])
    write_stories(root / "stories_valid.txt", stories[100:])
    (root / "books").mkdir()
    for i in range(3):
        (root / "books" / f"book{i}.txt").write_text(GUTENBERG_SAMPLE * (i + 2), encoding="utf-8")
    with open(root / "extra.jsonl", "w", encoding="utf-8") as handle:
        for i in range(10):
            handle.write(json.dumps({"content": f"A JSON document number {i}.", "id": i}) + "\n")
    return D.DataConfig.from_dict(
        {
            "root": str(root),
            "block_size": 16,
            "cache_dir": str(root / "cache"),
            "sources": [
                {"name": "stories", "path": "stories.txt"},
                {"name": "stories", "path": "stories_valid.txt", "split": "validation"},
                {"name": "books", "path": "books", "split": "holdout", "clean": "gutenberg", "chunk_chars": 120},
                {"path": "extra.jsonl", "text_field": "content"},
            ],
        }
    )


def test_load_documents_mixes_formats_with_a_fixed_split(tmp_path):
    config = _mixed_corpus(tmp_path)
    documents = D.load_documents(config)
    train, valid = documents["train"].to_dict(), documents["validation"].to_dict()
    assert set(train["source"]) == {"stories", "books", "extra"}
    assert train["source"].count("stories") == 100 and train["source"].count("extra") == 10
    assert valid["source"].count("stories") == 20
    books = [t for t, s in zip(train["text"] + valid["text"], train["source"] + valid["source"]) if s == "books"]
    assert books and all("Illustration" not in t and "CONTENTS" not in t for t in books)
    for text, source in zip(train["text"] + valid["text"], train["source"] + valid["source"]):
        if source == "books":  # held-out book chunks are exactly the hash-chosen ones
            assert C.is_heldout(text, 0.01) == (text in valid["text"])
    # cached: a second load reads the same Arrow files from the cache folder instead of rebuilding
    again = D.load_documents(config)
    assert list(again["train"]["text"]) == train["text"]
    assert all(str(tmp_path / "cache") in f["filename"] for f in again["train"].cache_files)
    # a changed file invalidates the cache (the fingerprint covers size and modification time)
    write_stories(tmp_path / "stories.txt", synthetic_stories(50, seed=1))
    assert list(D.load_documents(config)["train"]["source"]).count("stories") == 50


def test_evaluation_reads_the_same_validation_documents_as_training(tmp_path):
    """`corpus.validation_texts` (what the perplexity evaluation scores) is the training pipeline's split."""
    config = _mixed_corpus(tmp_path)
    valid = D.load_documents(config)["validation"].to_dict()
    books = next(s for s in config.sources if s.name == "books")
    assert C.validation_texts(books, tmp_path) == [t for t, s in zip(valid["text"], valid["source"]) if s == "books"]


def test_shipped_configs_declare_the_corpus_book_source():
    """The default mix's books in every shipped config are `corpus.PD_STORIES`, the held-out books evaluation
    scores (same chunking, same held-out fraction)."""
    import yaml

    for path in sorted((REPO / "train" / "configs").glob("*.yaml")):
        sources = yaml.safe_load(path.read_text())["data"]["sources"]
        books = [C.DataSource(**s) for s in sources if isinstance(s, dict) and s.get("path") == "pd-stories"]
        assert books in ([], [C.PD_STORIES]), path.name
    assert (C.PD_STORIES.chunk_chars, C.PD_STORIES.valid_fraction) == (4000, 0.01)


def test_data_dir_is_the_flag_else_the_environment_else_beside_the_checkout(monkeypatch, tmp_path):
    monkeypatch.delenv(C.DATA_DIR_ENV, raising=False)
    assert C.data_dir() == Path("..") / "shared" / "data"
    monkeypatch.setenv(C.DATA_DIR_ENV, str(tmp_path / "env"))
    assert C.data_dir() == tmp_path / "env"
    assert C.data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert D.DataConfig.from_dict({"sources": ["x.txt"]}).resolved_root() == tmp_path / "env"
    assert D.DataConfig.from_dict({"root": str(tmp_path), "sources": ["x.txt"]}).resolved_root() == tmp_path


def test_max_documents_takes_a_prefix(tmp_path):
    write_stories(tmp_path / "s.txt", synthetic_stories(40))
    config = D.DataConfig.from_dict(
        {"root": str(tmp_path), "cache_dir": str(tmp_path / "c"), "sources": [{"path": "s.txt", "max_documents": 7}]}
    )
    assert list(D.load_documents(config)["train"]["text"]) == [s.strip() for s in synthetic_stories(40)[:7]]


def test_bad_sources_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        D.DataConfig.from_dict({"sources": [{"path": "x", "splt": "train"}]})
    with pytest.raises(ValueError, match="`split` must be one of"):
        D.DataConfig.from_dict({"sources": [{"path": "x", "split": "test"}]})
    with pytest.raises(ValueError, match="non-empty `sources`"):
        D.DataConfig.from_dict({"block_size": 8})
    (tmp_path / "blimp").mkdir()
    (tmp_path / "blimp" / "a.jsonl").write_text('{"text": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="benchmark data"):
        C.resolve_source_files(C.DataSource(path="blimp"), tmp_path)
    with pytest.raises(FileNotFoundError, match="AMFORMERS_DATA_DIR"):
        C.resolve_source_files(C.DataSource(path="tinystories"), tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="matches no"):
        C.resolve_source_files(C.DataSource(path="nothing*.txt"), tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:1 has no 'text' field"):
        list(C.jsonl_documents(tmp_path / "bad.jsonl", "text"))


# -- packing ------------------------------------------------------------------------------------------


def test_packing_joins_documents_with_eos_exactly(tmp_path, small_tokenizer):
    stories = synthetic_stories(60)
    from datasets import Dataset

    documents = Dataset.from_dict({"text": stories, "source": ["s"] * 60, "split": ["train"] * 60})
    blocks = D.pack_documents(documents, small_tokenizer, block_size=16, seed=3)
    order = list(documents.shuffle(seed=3)["text"])
    stream = []
    for text in order:
        stream += small_tokenizer(text)["input_ids"] + [small_tokenizer.eos_token_id]
    expected = np.array(stream[: (len(stream) // 16) * 16]).reshape(-1, 16)
    assert np.array_equal(np.stack(blocks["input_ids"]), expected)
    assert stream[0] == small_tokenizer.bos_token_id
    # deterministic given the seed, different for another seed
    again = D.pack_documents(documents, small_tokenizer, block_size=16, seed=3)
    assert np.array_equal(np.stack(again["input_ids"]), expected)
    other = D.pack_documents(documents, small_tokenizer, block_size=16, seed=4)
    assert not np.array_equal(np.stack(other["input_ids"])[:4], expected[:4])


def test_sampler_order_depends_on_seed_and_epoch_only():
    sampler = D.EpochShuffleSampler(50, seed=7)
    first = list(sampler)
    assert sorted(first) == list(range(50)) and first == list(D.EpochShuffleSampler(50, seed=7))
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(D.EpochShuffleSampler(50, seed=8)) != first
    batch = D.collate_blocks([{"input_ids": np.arange(4, dtype=np.int32)}] * 2)
    assert batch["input_ids"].dtype == torch.long and batch["labels"] is batch["input_ids"]


# -- tokenizer ----------------------------------------------------------------------------------------


def test_trained_tokenizer_round_trips_through_save_pretrained(tmp_path, small_tokenizer):
    small_tokenizer.save_pretrained(str(tmp_path / "tok"))
    loaded = load_tokenizer(tmp_path / "tok")
    assert [loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id] == [0, 1, 2]
    assert loaded.convert_ids_to_tokens([0, 1, 2]) == SPECIAL_TOKENS
    text = "Lily saw a ball. Ünïcödé and emoji 🦊 survive byte-level BPE."
    ids = loaded(text)["input_ids"]
    assert ids[0] == loaded.bos_token_id
    assert loaded.decode(ids, skip_special_tokens=True) == text
    assert len(loaded) == 320


def test_load_tokenizer_refuses_missing_special_tokens(tmp_path, small_tokenizer):
    small_tokenizer.save_pretrained(str(tmp_path / "tok"))
    config_path = tmp_path / "tok" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["pad_token"] = config["eos_token"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="distinct ids"):
        load_tokenizer(tmp_path / "tok")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "nowhere")


def test_shipped_tokenizer_is_the_default():
    tokenizer = load_tokenizer()
    assert len(tokenizer) == 8192
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    text = "Once upon a time, there was a little girl named Lily."
    ids = tokenizer(text)["input_ids"]
    assert len(ids) < 16  # real merges, not bytes
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_command_trains_on_a_config(tmp_path):
    from amformers.train.tokenizer import main

    write_stories(tmp_path / "train.txt", synthetic_stories(200))
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"data": {"sources": [{"path": "train.txt"}]}}), encoding="utf-8")
    output = main(
        ["--config", str(config), "--data-dir", str(tmp_path), "--vocab_size", "300", "--output_dir",
         str(tmp_path / "tok"), "--cache_dir", str(tmp_path / "cache")]
    )  # fmt: skip
    info = json.loads((output / "training_info.json").read_text())
    assert info["vocab_size"] == 300 and info["trained_on"]["documents"] == 200
    assert len(load_tokenizer(output)) == 300


@pytest.mark.skipif(not (SHARED_DATA / "pd-stories").is_dir(), reason="../shared/data/pd-stories is not present")
def test_shared_books_clean_up():
    for name in ("the-jungle-book.txt", "little-women.txt", "indian-fairy-tales.txt"):
        path = SHARED_DATA / "pd-stories" / name
        if not path.is_file():
            continue
        cleaned = C.clean_gutenberg(path.read_text(encoding="utf-8"))
        assert "[Illustration" not in cleaned
        head = cleaned[:3000]
        assert "CONTENTS" not in head and "Contents" not in head
        long_lines = [line for line in cleaned.split("\n") if len(line) > 400]
        assert long_lines, "hard-wrapped paragraphs should have been joined"
