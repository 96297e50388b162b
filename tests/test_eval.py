"""The language-model evaluation suites (amformers.eval) on a tiny random AttnStream and on models whose
logits we control, plus the lm-eval tasks through HFLM and through the lm-eval CLI."""

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from amformers import AttnStreamConfig, AttnStreamForCausalLM
from amformers.eval import babi, blimp, build_tasks, harness, ioi, perplexity
from amformers.eval.__main__ import main as eval_main
from amformers.eval.common import document_nll, encode, prefix_token_id, score_continuations
from amformers.eval.results import FIELDS, METRICS, read_result, write_result

REPO = Path(__file__).resolve().parents[1]


class UnigramLM(torch.nn.Module):
    """Same next-token logits at every position: every score is a sum of known log-softmax entries."""

    def __init__(self, logits: torch.Tensor, max_length: int = 512):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone(), requires_grad=False)
        self.config = SimpleNamespace(max_position_embeddings=max_length)

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))

    def logprob(self, ids: list[int]) -> float:
        return float(torch.log_softmax(self.logits, -1)[ids].sum())


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tiny_attn_stream")
    torch.manual_seed(0)
    config = AttnStreamConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=256,
        pad_token_id=tiny_tokenizer.pad_token_id,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
    )
    AttnStreamForCausalLM(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from amformers.eval.common import load_model

    return load_model(tiny_model_dir)


def direct_logprob(model, ids: list[int], n: int) -> float:
    """log P(last n of ids) from one unbatched forward pass: the reference for the batched scorer."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return float(sum(logprobs[i - 1, ids[i]] for i in range(len(ids) - n, len(ids))))


def test_batched_scoring_matches_unbatched_forward(tiny_model):
    model, tok = tiny_model
    pairs = [("Lily went to the park.", " She"), ("", "The cat sat on the mat."), ("Tom and Sam", " were friends")]
    scores = score_continuations(model, tok, pairs, batch_size=3)  # right-padded batch of three lengths
    prefix = prefix_token_id(tok)
    for (context, continuation), score in zip(pairs, scores):
        cont = (
            encode(tok, context + continuation)[len(encode(tok, context)) :] if context else encode(tok, continuation)
        )
        ids = [prefix] + (encode(tok, context) if context else []) + cont
        assert score.num_tokens == len(cont)
        assert score.logprob == pytest.approx(direct_logprob(model, ids, len(cont)), abs=1e-4)


def test_ioi_prompts_follow_the_sources():
    official = ioi.official_prompts()
    assert len(official) == 8
    first = official[0]
    assert first["prompt"] == "After John and Mary went to the store, John gave a bottle of milk to"
    assert (first["io"], first["s"]) == ("Mary", "John")
    assert official[1]["prompt"].startswith("After Mary and John") and official[1]["io"] == "John"
    wang = ioi.wang_prompts("tinystories", per_template=2, seed=1)
    assert len(wang) == 15 * 2 * 2
    baba, abba = wang[0], wang[1]
    names = ioi.VOCABULARIES["tinystories"]["names"]
    assert baba["io"] in names and baba["s"] in names and baba["io"] != baba["s"]
    assert baba["prompt"] == f"Then, {baba['s']} and {baba['io']} went to the " + baba["prompt"].split("the ", 1)[1]
    assert abba["prompt"].startswith(f"Then, {abba['io']} and {abba['s']}")
    assert all(p["prompt"].endswith(" to") for p in wang)  # the answer is left out


def test_ioi_scores_on_a_model_with_controlled_logits(tiny_tokenizer):
    tok = tiny_tokenizer
    logits = torch.zeros(len(tok))
    mary = encode(tok, " Mary")
    logits[mary] = 4.0  # the model loves " Mary": right when Mary is IO, wrong when she is the subject
    model = UnigramLM(logits)
    rows = ioi.score_prompts(model, tok, ioi.official_prompts()[:2])
    expected_diff = model.logprob(mary) - model.logprob(encode(tok, " John"))
    assert expected_diff > 0
    assert rows[0]["logit_diff"] == pytest.approx(expected_diff, abs=1e-5)  # IO = Mary
    assert rows[1]["logit_diff"] == pytest.approx(-expected_diff, abs=1e-5)  # IO = John
    summary = ioi.summarise(rows)
    assert summary["accuracy"] == 0.5
    assert summary["mean_p_io"] == pytest.approx(
        (math.exp(model.logprob(mary)) + math.exp(model.logprob(encode(tok, " John")))) / 2, rel=1e-5
    )
    assert summary["mean_logit_diff"] == pytest.approx(0.0, abs=1e-5)


def write_blimp(folder: Path) -> list[dict]:
    pairs = [
        {"sentence_good": "The cat sat on the mat.", "sentence_bad": "The cat sat on the mats the.", "UID": "a"},
        {"sentence_good": "Mary has a book.", "sentence_bad": "Mary have a book.", "UID": "a"},
        {"sentence_good": "Tom and Sam were friends.", "sentence_bad": "Tom and Sam was friends.", "UID": "b"},
    ]
    folder.mkdir(parents=True, exist_ok=True)
    for uid in ("a", "b"):
        lines = [
            json.dumps({**p, "field": "syntax", "linguistics_term": f"term_{uid}"}) for p in pairs if p["UID"] == uid
        ]
        (folder / f"{uid}.jsonl").write_text("\n".join(lines) + "\n")
    return pairs


def test_blimp_accuracy_equals_a_hand_count(tiny_model, tmp_path):
    model, tok = tiny_model
    pairs = write_blimp(tmp_path / "blimp")
    prefix = prefix_token_id(tok)
    by_hand = []
    for p in pairs:
        good, bad = (encode(tok, p[k]) for k in ("sentence_good", "sentence_bad"))
        by_hand.append(
            direct_logprob(model, [prefix] + good, len(good)) > direct_logprob(model, [prefix] + bad, len(bad))
        )
    result = blimp.evaluate(model, tok, blimp.load_pairs(tmp_path / "blimp"))
    assert result["n"] == 3
    assert result["accuracy"] == pytest.approx(sum(by_hand) / 3)
    assert result["per_paradigm"]["a"] == pytest.approx(sum(by_hand[:2]) / 2)
    assert result["per_paradigm"]["b"] == float(by_hand[2])
    assert result["per_phenomenon"] == {"term_a": result["per_paradigm"]["a"], "term_b": result["per_paradigm"]["b"]}


def test_blimp_suite_skips_cleanly_without_data(tiny_model_dir, tmp_path, capsys):
    out = eval_main(
        ["blimp", "--model", str(tiny_model_dir), "--blimp-data", str(tmp_path), "--results-dir", str(tmp_path)]
    )
    assert out == {"blimp": None}
    assert "skipping" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.json"))


BABI_TEXT = """1 Mary moved to the bathroom.
2 John went to the hallway.
3 Where is Mary? \tbathroom\t1
4 Daniel went back to the kitchen.
5 Where is Daniel? \tkitchen\t4
1 Sandra journeyed to the kitchen.
2 Where is Sandra? \tkitchen\t1
"""


def test_babi_parsing_and_accuracy(tmp_path, tiny_tokenizer):
    (tmp_path / "qa1_single-supporting-fact_test.txt").write_text(BABI_TEXT)
    questions = babi.parse_task(tmp_path / "qa1_single-supporting-fact_test.txt")
    assert [q["answer"] for q in questions] == ["bathroom", "kitchen", "kitchen"]
    assert questions[1]["story"] == [
        "Mary moved to the bathroom.",
        "John went to the hallway.",
        "Daniel went back to the kitchen.",
    ]
    assert questions[2]["story"] == ["Sandra journeyed to the kitchen."]  # a new story starts at ID 1
    assert babi.prompt_for(questions[2]) == "Sandra journeyed to the kitchen.\nQuestion: Where is Sandra?\nAnswer:"
    logits = torch.zeros(len(tiny_tokenizer))
    logits[encode(tiny_tokenizer, " kitchen")] = 3.0  # always answers "kitchen"
    result = babi.evaluate(UnigramLM(logits), tiny_tokenizer, tmp_path)
    task = result["per_task"]["qa1_single-supporting-fact"]
    assert task == {"n": 3, "accuracy": pytest.approx(2 / 3), "num_candidates": 2, "chance": 0.5}


def test_perplexity_matches_the_model_loss_and_bpb_formula(tiny_model):
    model, tok = tiny_model
    text = "Once upon a time, there was a little girl named Lily. She liked to play in the park."
    ids = [prefix_token_id(tok)] + encode(tok, text)
    nll, tokens = document_nll(model, tok, text)
    assert tokens == len(ids) - 1
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert nll / tokens == pytest.approx(float(loss), rel=1e-5)
    m = perplexity.metrics(nll, tokens, len(text.encode()), 1)
    assert m["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert m["bits_per_byte"] * math.log(2) * m["bytes"] == pytest.approx(nll)
    assert m["bits_per_byte"] == pytest.approx(m["loss"] / math.log(2) / m["bytes_per_token"])


def test_windowed_perplexity_scores_every_token_once(tiny_tokenizer):
    text = " ".join(["The cat sat on the mat and looked at the bird."] * 6)
    model = UnigramLM(torch.randn(len(tiny_tokenizer)), max_length=16)
    ids = encode(tiny_tokenizer, text)
    nll, tokens = document_nll(model, tiny_tokenizer, text, max_length=16, stride=5)
    assert tokens == len(ids) > 16
    assert nll == pytest.approx(-model.logprob(ids), rel=1e-5)  # context-free model: windows must not matter


def test_cli_suites_write_json(tiny_model_dir, tmp_path):
    stories = tmp_path / "valid.txt"
    stories.write_text("Lily went to the park.\n<|endoftext|>\nTom had a red ball. He liked it.\n<|endoftext|>\n")
    book = tmp_path / "book.txt"
    book.write_text("The bird sang a happy song. " * 40)
    common = ["--model", str(tiny_model_dir), "--results-dir", str(tmp_path / "res"), "--name", "tiny"]
    eval_main(["ioi", *common, "--limit", "2", "--per-template", "1"])
    eval_main(
        [
            "perplexity",
            *common,
            "--tinystories",
            str(stories),
            "--book",
            str(book),
            "--max-length",
            "64",
            "--no-heldout-books",
        ]
    )
    eval_main(["precision", *common, "--limit", "2"])
    eval_main(["generate", *common, "--max-new-tokens", "4"])
    res = tmp_path / "res" / "tiny"
    for suite in ("ioi", "perplexity", "precision", "generate"):  # every suite writes the one schema
        record = read_result(res / f"{suite}.json")
        assert tuple(record) == FIELDS and (record["model"], record["suite"]) == ("tiny", suite)
        assert record["provenance"]["model_dir"] == str(tiny_model_dir.resolve())
        assert record["metrics"]["parameters"] == record["provenance"]["model_summary"]["num_parameters"] > 0
    ioi_json = read_result(res / "ioi.json")
    assert ioi_json["command"].startswith("python -m amformers.eval ioi --model")
    sets = {row["set"]: row for row in ioi_json["tables"]["sets"]}
    assert set(sets) == {"official", "wang-tinystories", "wang-wang"} and sets["official"]["n"] == 2
    assert ioi_json["metrics"]["ioi_accuracy"] == sets["wang-tinystories"]["accuracy"]
    assert ioi_json["settings"] == {"per_template": 1, "seed": 0, "limit": 2}
    ppl = read_result(res / "perplexity.json")
    sources = {row["source"]: row for row in ppl["tables"]["sources"]}
    assert sources["tinystories-valid"]["documents"] == 2 and "book:book" in sources
    assert ppl["metrics"]["tinystories_valid_perplexity"] == sources["tinystories-valid"]["perplexity"]
    assert "heldout_books_bits_per_byte" not in ppl["metrics"]  # --no-heldout-books; a --book is a table row only
    precision = read_result(res / "precision.json")
    assert precision["tables"]["comparison"][0]["passed"] and precision["metrics"]["precision_top1_agreement"] > 0.5
    samples = read_result(res / "generate.json")["tables"]["samples"]
    assert len(samples) == 3 and all(s["greedy"] for s in samples)


def test_results_default_to_the_working_directory_and_data_to_data_dir(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AMFORMERS_DATA_DIR", str(tmp_path / "elsewhere"))  # the flag wins; restored after the test
    data = tmp_path / "data"
    write_blimp(data / "blimp")
    eval_main(["blimp", "--model", str(tiny_model_dir), "--data-dir", str(data)])
    record = read_result(tmp_path / "eval_results" / tiny_model_dir.name / "blimp.json")
    assert record["settings"]["data"] == str((data / "blimp").resolve()) and record["metrics"]["blimp_pairs"] == 3
    with pytest.raises(SystemExit, match="is not a folder"):
        eval_main(["blimp", "--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "missing")])


def test_result_schema_rejects_bad_records(tmp_path):
    good = {
        "model": "m", "suite": "blimp", "command": "c", "settings": {}, "metrics": {"blimp_accuracy": 0.5},
        "tables": {"phenomena": [{"phenomenon": "x", "accuracy": 0.5}]}, "provenance": {},
    }  # fmt: skip
    path = write_result(tmp_path / "m" / "blimp.json", **good)
    assert read_result(path)["metrics"] == {"blimp_accuracy": 0.5}
    for change, message in (
        ({"metrics": {"blimp_score": 0.5}}, "metric 'blimp_score' is not declared"),
        ({"metrics": {"blimp_accuracy": "high"}}, "must be a number or null"),
        ({"metrics": {"blimp_accuracy": True}}, "must be a number or null"),
        ({"tables": {"phenomena": [1, 2]}}, "table 'phenomena' must be a list of objects"),
        ({"model": ""}, "model must be a non-empty string"),
    ):
        with pytest.raises(ValueError, match=message):
            write_result(tmp_path / "bad.json", **{**good, **change})
    assert not (tmp_path / "bad.json").exists()
    nan = write_result(tmp_path / "nan.json", **{**good, "metrics": {"blimp_accuracy": float("nan")}})
    assert read_result(nan)["metrics"] == {"blimp_accuracy": None}
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"suite": "blimp", "accuracy": 0.5}))
    with pytest.raises(ValueError, match=r"old.json: schema is None"):
        read_result(old)
    assert all(metric.label and metric.description for metric in METRICS.values())


def test_a_folder_without_config_json_is_named_plainly(tmp_path, tiny_tokenizer):
    """Every loader of a user's model folder says "<folder> has no config.json" instead of a transformers error."""
    from amformers.convert import llama_to_attn_stream, mamba2_to_palimpsa
    from amformers.eval.common import load_model
    from amformers.model_folder import ModelFolderError, require_model_folder
    from amformers.train import ship

    folder = tmp_path / "not_a_model"
    folder.mkdir()
    tiny_tokenizer.save_pretrained(folder)  # a tokenizer alone is not a model
    message = f"{folder} has no config.json (not a saved model folder?)"
    calls = {
        "load_model": lambda: load_model(folder),
        "amformers.eval": lambda: eval_main(["ioi", "--model", str(folder), "--results-dir", str(tmp_path)]),
        "ship": lambda: ship.ship(folder, tmp_path / "shipped"),
        "llama_to_attn_stream": lambda: llama_to_attn_stream(str(folder)),
        "mamba2_to_palimpsa": lambda: mamba2_to_palimpsa(folder),
    }
    for name, call in calls.items():
        with pytest.raises(ModelFolderError) as caught:
            call()
        assert str(caught.value) == message, name
    with pytest.raises(ModelFolderError, match="does not exist"):
        llama_to_attn_stream(str(tmp_path / "missing" / "llama"))  # a local path, not a Hub repo id
    assert require_model_folder("org/model", allow_hub_id=True) == "org/model"  # left to from_pretrained
    # the command line prints the message alone, without a traceback
    result = subprocess.run(
        [sys.executable, "-m", "amformers.eval", "ioi", "--model", str(folder)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert result.returncode == 1 and result.stderr.strip() == f"error: {message}", result.stderr


def test_cloze_items_are_lambada_style():
    story = (
        "Tom had a red ball. He liked to play with the ball in the park every day with his dog Max.\n"
        "One day he lost his ball"
    )
    items = build_tasks.cloze_items([story], min_context_words=5)
    assert [i["target"] for i in items] == [" ball"]
    assert items[0]["context"].endswith("One day he lost his")


def test_lm_eval_tasks_through_hflm_agree_with_our_blimp(tiny_model, tmp_path, monkeypatch):
    from amformers.eval.harness import run_tasks

    model, tok = tiny_model
    write_blimp(tmp_path / "blimp")
    monkeypatch.setenv("AMFORMERS_BLIMP_DIR", str(tmp_path / "blimp"))
    results = run_tasks(model, tok, ["amformers_blimp", "amformers_ioi", "amformers_tinystories_cloze"], limit=3)
    ours = blimp.evaluate(model, tok, blimp.load_pairs(tmp_path / "blimp"))
    assert results["amformers_blimp"]["acc,none"] == pytest.approx(ours["accuracy"])
    assert 0.0 <= results["amformers_ioi"]["acc,none"] <= 1.0
    assert results["amformers_tinystories_cloze"]["perplexity,none"] > 1.0


def test_tasks_path_prints_the_installed_task_folder_and_nothing_else(tmp_path):
    command = [sys.executable, "-m", "amformers.eval", "tasks-path"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    folder = Path(done.stdout.strip())
    assert done.stdout == f"{folder}\n" and folder.is_absolute()
    assert {p.name for p in folder.glob("*.yaml")} == {
        "amformers_ioi.yaml", "amformers_blimp.yaml", "amformers_tinystories_cloze.yaml"
    }  # fmt: skip
    assert (folder / "task_data.py").is_file() and (folder / "data" / "ioi.jsonl").is_file()


def test_lm_eval_cli_runs_our_tasks_from_any_directory(tiny_model_dir, tmp_path):
    """The documented command, run outside the repository: the task folder comes from `tasks-path`, the tag
    `amformers` runs all three tasks, IOI and cloze read their data beside the YAMLs and BLiMP reads
    $AMFORMERS_DATA_DIR/blimp."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_blimp(tmp_path / "data" / "blimp")
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "AMFORMERS_DATA_DIR": str(tmp_path / "data"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }  # fmt: skip
    env.pop("AMFORMERS_BLIMP_DIR", None)
    command = (
        "lm-eval run --model hf --model_args pretrained={model},trust_remote_code=True "
        '--include_path "$(python -m amformers.eval tasks-path)" --tasks amformers --device cpu '
        "--limit 2 --output_path {out}"
    ).format(model=shlex.quote(str(tiny_model_dir)), out=shlex.quote(str(tmp_path / "out")))
    done = subprocess.run(
        ["bash", "-c", command], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result_files = list((tmp_path / "out").rglob("results*.json"))
    assert result_files, done.stdout[-2000:]
    results = json.loads(result_files[0].read_text())["results"]
    assert {"amformers_ioi", "amformers_blimp", "amformers_tinystories_cloze"} <= set(results)
    assert results["amformers_ioi"]["acc,none"] in (0.0, 0.5, 1.0)
    assert results["amformers_tinystories_cloze"]["perplexity,none"] > 1.0


def test_lm_eval_blimp_without_data_names_the_fix(tmp_path, monkeypatch):
    from amformers.eval.tasks import task_data

    monkeypatch.delenv("AMFORMERS_BLIMP_DIR", raising=False)
    monkeypatch.setenv("AMFORMERS_DATA_DIR", str(tmp_path))
    assert task_data.blimp_dir() == tmp_path / "blimp"
    with pytest.raises(FileNotFoundError, match="set AMFORMERS_DATA_DIR.*--tasks amformers_ioi"):
        task_data.load_blimp()


def test_report_renders_tables_from_results(tiny_model_dir, tmp_path):
    from experiments.amicl import run as amicl
    from experiments.icl_reddy import run as icl_reddy
    from experiments.mqar import sweep as mqar_sweep
    from experiments.report.__main__ import render

    lab, results = tmp_path / "lab", tmp_path / "results"
    amicl.main(["--trials", "20", "--seeds", "1", "--sweep-points", "3", "--out", str(lab / "amicl" / "amicl.json")])
    eval_main(
        ["ioi", "--model", str(tiny_model_dir), "--limit", "2", "--per-template", "1", "--results-dir", str(results)]
    )
    for variant in ("baseline", "values", "learned-values"):
        icl_reddy.train(
            variant, 0, iterations=2, eval_every=2, test_size=8, batch_size=4, run_dir=tmp_path / f"runs/{variant}_s0"
        )
    icl_reddy.summarise(lab / "icl_reddy" / "icl_reddy.json", tmp_path / "runs")
    out = tmp_path / "REPORT.md"
    text = render(results, out=out, lab=lab)
    assert out.read_text() == text
    assert "| values | 1 |" in text and (lab / "icl_reddy" / "icl_reddy.png").is_file()
    (learned,) = [
        r["history"][-1]["stream_weights"]
        for r in json.loads((lab / "icl_reddy" / "icl_reddy.json").read_text())["runs"]
        if r["variant"] == "learned-values"
    ]
    assert "| learned-values | 1 |" in text and "({:.2f}, {:.2f})".format(*learned) in text
    runs = tmp_path / "mqar"
    mqar_sweep.run_sweep(["palimpsa", "not_palimpsa"], [16, 32], [(16, 2)], [3e-3], 8, 8, 1, 8, [0], runs, 32)
    mqar_sweep.summarise(runs / "results.jsonl", lab / "mqar" / "mqar.json")
    text = render(results, out=out, lab=lab)
    assert "## MQAR" in text and "| equal state size | 16 | 2 | 0 | palimpsa | 16 |" in text
    assert (lab / "mqar" / "mqar.png").is_file()
    ioi_json = read_result(results / tiny_model_dir.name / "ioi.json")
    assert f"{ioi_json['metrics']['ioi_official_accuracy']:.4f}" in text
    assert "| 100 | 512 | 20 | 1.25 | 907 |" in text and (lab / "amicl" / "amicl.png").is_file()


SHIPPED = ("attn_stream-8m", "attn_stream-baseline-8m", "palimpsa-8m", "notpalimpsa-8m")
# Headline numbers written into copies of the real suite files: (IOI acc, IOI logit diff, TinyStories ppl, BLiMP acc)
HEADLINES = {
    "attn_stream-8m": (0.75, 1.5, 30.0, 0.6),
    "attn_stream-baseline-8m": (0.5, 0.25, 31.0, 0.6),
    "palimpsa-8m": (0.5, 0.5, 20.0, 0.625),
    "notpalimpsa-8m": (0.5, 0.5, 25.0, 0.5),
}


def markdown_tables(text: str) -> list[list[dict]]:
    """Every GitHub-markdown table in `text` as a list of {column: cell} rows."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip("|").split("|")])
        elif current:
            header, rows = current[0], current[2:]
            tables.append([dict(zip(header, row)) for row in rows])
            current = []
    return tables


@pytest.fixture(scope="module")
def shipped_results(tiny_model_dir, tiny_model, tmp_path_factory):
    """<results>/<name>/<suite>.json for the four shipped names, in the result schema: every suite runs once on
    the tiny model (small fake data), then its files are copied under each name with known headline numbers."""
    root = tmp_path_factory.mktemp("shipped")
    stories = root / "valid.txt"
    stories.write_text("Lily went to the park.\n<|endoftext|>\nTom had a red ball. He liked it.\n<|endoftext|>\n")
    book = root / "book.txt"
    book.write_text("The bird sang a happy song. " * 20)
    write_blimp(root / "blimp")
    (root / "babi").mkdir()
    (root / "babi" / "qa1_single-supporting-fact_test.txt").write_text(BABI_TEXT)
    results = root / "results"
    common = ["--model", str(tiny_model_dir), "--results-dir", str(results), "--name", "run"]
    eval_main(["ioi", *common, "--limit", "2", "--per-template", "1"])
    eval_main(["perplexity", *common, "--tinystories", str(stories), "--book", str(book), "--no-heldout-books",
               "--max-length", "64"])  # fmt: skip
    eval_main(["blimp", *common, "--blimp-data", str(root / "blimp")])
    eval_main(["babi", *common, "--babi-data", str(root / "babi")])
    run = results / "run"
    # lm-eval costs ~20 s of task indexing, so its file comes from the suite's own writer with the metrics as
    # harness.run_tasks returns them (test_lm_eval_tasks_through_hflm_agree_with_our_blimp runs the real thing)
    lm_eval = {"amformers_tinystories_cloze": {"sample_len": 2, "perplexity,none": 812.5, "acc,none": 0.5}}
    write_result(
        run / "lm-eval.json", model="run", suite="lm-eval",
        command=f"python -m amformers.eval lm-eval {' '.join(common)} --limit 2",
        settings={"tasks": ["amformers_tinystories_cloze"], "limit": 2}, metrics=harness.headline_metrics(lm_eval),
        tables={"tasks": [{"task": "amformers_tinystories_cloze", "sample_len": 2, "perplexity": 812.5, "acc": 0.5}]},
        provenance={"model_dir": str(tiny_model_dir)},
    )  # fmt: skip
    ppl = read_result(run / "perplexity.json")
    # the pd-stories holdout is too big for a unit test: a --book source has exactly its fields
    (book_row,) = [row for row in ppl["tables"]["sources"] if row["source"] == "book:book"]
    book_row["source"] = "pd-stories-holdout"
    ppl["metrics"].update(perplexity.headline_metrics({"pd-stories-holdout": book_row}))
    write_result(run / "perplexity.json", **{k: v for k, v in ppl.items() if k != "schema"})
    for name, (ioi_acc, logit_diff, perplexity_value, blimp_acc) in HEADLINES.items():
        (results / name).mkdir()
        records = {p.stem: read_result(p) for p in run.glob("*.json")}
        records["ioi"]["metrics"].update(ioi_accuracy=ioi_acc, ioi_mean_logit_diff=logit_diff)
        records["perplexity"]["metrics"]["tinystories_valid_perplexity"] = perplexity_value
        (valid,) = [row for row in records["perplexity"]["tables"]["sources"] if row["source"] == "tinystories-valid"]
        valid["perplexity"] = perplexity_value
        records["blimp"]["metrics"]["blimp_accuracy"] = blimp_acc
        checkpoint = root / "checkpoints" / name  # as amformers.train.ship leaves it, for the training tokens
        checkpoint.mkdir(parents=True)
        (checkpoint / "training_summary.json").write_text(json.dumps({"steps": 1000, "tokens": 8_192_000}))
        for suite, record in records.items():
            record["command"] = record["command"].replace("--name run", f"--name {name}")
            record["provenance"]["model_dir"] = str(checkpoint)
            write_result(
                results / name / f"{suite}.json", **{k: v for k, v in record.items() if k != "schema"} | {"model": name}
            )
    shutil.rmtree(run)
    write_result(
        results / "attn_stream-8m" / "babi_lora.json", model="attn_stream-8m", suite="babi_lora",
        command="python examples/finetune_babi_lora.py --model checkpoints/attn_stream-8m", settings={"task": 1},
        metrics={"babi_lora_accuracy_before": 0.25, "babi_lora_accuracy_after": 0.875}, tables={}, provenance={},
    )  # fmt: skip
    (results / "not-a-model").mkdir()  # no result files: not a model
    return results


def test_a_results_folder_with_an_old_or_foreign_file_is_named_in_the_error(shipped_results, tmp_path):
    from amformers.eval.results import read_results

    copy = tmp_path / "results"
    shutil.copytree(shipped_results, copy)
    (copy / "palimpsa-8m" / "notes.json").write_text("{}")
    with pytest.raises(ValueError, match=r"palimpsa-8m/notes.json: schema is None"):
        read_results(copy)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_results(tmp_path / "nowhere")


def test_comparison_table_has_a_row_per_model_and_paired_differences(shipped_results):
    from experiments.model_eval import report
    from experiments.report.__main__ import render

    text = "\n".join(report.comparison_section(shipped_results))
    table, pairs = markdown_tables(text)
    assert [row["model"] for row in table] == sorted(SHIPPED)  # "not-a-model" has no suite results
    rows = {row["model"]: row for row in table}
    run = read_result(shipped_results / "palimpsa-8m" / "perplexity.json")
    for name, (ioi_acc, logit_diff, perplexity_value, blimp_acc) in HEADLINES.items():
        row = rows[name]
        assert row["IOI acc (wang-tinystories)"] == f"{ioi_acc:.4f}"
        assert row["IOI logit diff (wang-tinystories)"] == f"{logit_diff:.4f}"
        assert row["TinyStories valid ppl"] == f"{perplexity_value:.4f}"
        assert row["BLiMP acc"] == f"{blimp_acc:.4f}"
        assert row["parameters"] == str(run["metrics"]["parameters"])
        assert row["held-out books bits/byte"] == f"{run['metrics']['heldout_books_bits_per_byte']:.4f}"
        assert float(row["bAbI mean acc (zero-shot)"]) >= 0
        assert (row["lm-eval tinystories_cloze acc"], row["lm-eval tinystories_cloze perplexity"]) == (
            "0.5000",
            "812.5000",
        )
    assert "lm-eval tinystories_cloze sample_len" not in table[0]  # a count, not a metric
    assert (rows["attn_stream-8m"]["bAbI LoRA acc before"], rows["attn_stream-8m"]["bAbI LoRA acc after"]) == (
        "0.2500",
        "0.8750",
    )
    assert rows["palimpsa-8m"]["bAbI LoRA acc after"] == ""  # no babi_lora.json: empty cell
    assert rows["palimpsa-8m"]["--limit"] == "all, 2"  # ioi and lm-eval ran with --limit 2
    assert rows["notpalimpsa-8m"]["training tokens"] == "8192000"
    by_metric = {(row["comparison"].split(" ")[0], row["metric"]): row for row in pairs}
    ioi = by_metric[("attn_stream-8m", "IOI acc (wang-tinystories)")]
    assert (ioi["model"], ioi["twin"], ioi["difference"], ioi["model is"]) == ("0.7500", "0.5000", "0.2500", "higher")
    assert by_metric[("attn_stream-8m", "IOI logit diff (wang-tinystories)")]["difference"] == "1.2500"
    ppl = by_metric[("palimpsa-8m", "TinyStories valid ppl")]
    assert (ppl["difference"], ppl["model is"]) == ("-5.0000", "lower")
    assert by_metric[("palimpsa-8m", "BLiMP acc")]["model is"] == "higher"
    assert by_metric[("palimpsa-8m", "IOI acc (wang-tinystories)")]["model is"] == "equal"
    assert ("attn_stream-8m", "BLiMP acc") not in by_metric  # only the metrics a pair is about
    assert by_metric[("attn_stream-8m", "training tokens")]["model is"] == "equal"
    full = render(shipped_results, out=shipped_results.parent / "REPORT.md", lab=shipped_results.parent / "lab")
    assert full.index("## Model comparison") < full.index("## Model `attn_stream-8m`")


def tiny_checkpoint(folder: Path, tokenizer, markers: bool = True) -> Path:
    """A checkpoint folder whose README.md is rendered by the pretraining export's write_model_card."""
    from amformers.model_card import write_model_card
    from amformers.train.config import load_config

    config = load_config(REPO / "train" / "configs" / "attn_stream-8m.yaml")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    context = {
        "model_type": config["model_type"], "model_fields": config["model"], "parameters": 1234, "steps": 3,
        "tokens_seen": 768, "val_loss": 2.0, "val_perplexity": math.exp(2.0), "training": config["training"],
        "processes": 1, "distributed_type": "NO", "data_sources": config["data"]["sources"],
        "block_size": config["data"]["block_size"], "training_curve": None, "generation": config["generation"],
        "samples": [{"prompt": "Once upon a time", "completion": "there was a cat."}], "vocab_size": len(tokenizer),
    }  # fmt: skip
    path = write_model_card(folder, config, context)
    text = path.read_text()
    assert report_markers() <= set(text.splitlines())  # the template carries the markers
    if not markers:
        path.write_text("\n".join(line for line in text.splitlines() if line not in report_markers()) + "\n")
    return path


def report_markers() -> set[str]:
    from amformers import model_card

    return {model_card.CARD_BEGIN, model_card.CARD_END}


def test_cards_write_eval_results_and_model_index_idempotently(shipped_results, tiny_tokenizer, tmp_path):
    from huggingface_hub import ModelCard

    from amformers import model_card as report
    from experiments.report.__main__ import main as report_main

    checkpoints = tmp_path / "checkpoints"
    card = tiny_checkpoint(checkpoints / "attn_stream-8m", tiny_tokenizer)
    card.write_text(card.read_text().replace(report.CARD_END, f"stale numbers\n{report.CARD_END}"))
    bare = tiny_checkpoint(checkpoints / "palimpsa-8m", tiny_tokenizer, markers=False)
    tiny_checkpoint(checkpoints / "unevaluated", tiny_tokenizer)
    untouched = (checkpoints / "unevaluated" / "README.md").read_text()
    report.main(["--results", str(shipped_results), "--checkpoints", str(checkpoints)])

    record = json.loads((checkpoints / "attn_stream-8m" / "eval_results.json").read_text())
    ppl = read_result(shipped_results / "attn_stream-8m" / "perplexity.json")
    assert record["tinystories_valid_perplexity"] == ppl["metrics"]["tinystories_valid_perplexity"] == 30.0
    assert (record["ioi_accuracy"], record["babi_lora_accuracy_after"]) == (0.75, 0.875)
    settings = record["perplexity_settings"]["tinystories-valid"]
    (tiny_valid,) = [row for row in ppl["tables"]["sources"] if row["source"] == "tinystories-valid"]
    assert (settings["documents"], settings["tokens"], settings["nll_nats"]) == (
        2,
        tiny_valid["tokens"],
        tiny_valid["nll_nats"],
    )
    assert (settings["max_length"], settings["window_tokens"], settings["stride_tokens"]) == (64, 64, 32)
    assert settings["path_sha256"] and "--max-length 64" in settings["recompute_command"]
    assert record["commands"]["ioi"].startswith("python -m amformers.eval ioi") and "lm-eval" in record["commands"]
    assert record["limits"] == {"ioi": 2, "lm-eval": 2, "perplexity": None, "blimp": None, "babi": None}
    assert not (checkpoints / "unevaluated" / "eval_results.json").exists()
    assert (checkpoints / "unevaluated" / "README.md").read_text() == untouched

    loaded = ModelCard.load(card)
    assert loaded.data.license == "apache-2.0" and loaded.data.datasets == ["roneneldan/TinyStories"]
    assert "attn_stream" in loaded.data.tags and loaded.data.language == ["en"]
    values = {(r.dataset_type, r.metric_type): r.metric_value for r in loaded.data.eval_results}
    assert values[("held-out-pretraining-split", "perplexity")] == round(math.exp(2.0), 4)  # pretraining's entry
    assert values[("roneneldan/TinyStories", "perplexity")] == 30.0
    assert values[("amformers/ioi-wang-tinystories", "accuracy")] == 0.75
    assert values[("nyu-mll/blimp", "accuracy")] == 0.6
    assert ("amformers/amformers_tinystories_cloze", "acc") in values
    assert all(r.task_type == "text-generation" for r in loaded.data.eval_results)
    body = loaded.text
    assert body.count(report.CARD_BEGIN) == 1 and "stale numbers" not in body
    block = body.split(report.CARD_BEGIN)[1].split(report.CARD_END)[0]
    assert "| IOI acc (wang-tinystories) | 0.7500 |" in block and "IOI:" in block and "BLiMP (3 pairs):" in block
    assert "Suites capped with `--limit` (examples per task / paradigm / set): ioi 2, lm-eval 2." in block
    assert body.index(report.CARD_END) < body.index("## Sample generations")

    bare_text = bare.read_text()
    assert bare_text.index(report.CARD_BEGIN) < bare_text.index("## Sample generations")
    assert "| TinyStories valid ppl | 20.0000 |" in bare_text

    first = {p: p.read_bytes() for p in checkpoints.rglob("*") if p.is_file()}
    report_main(["--results", str(shipped_results), "--cards", str(checkpoints)])  # the report's --cards is the same
    assert {p: p.read_bytes() for p in checkpoints.rglob("*") if p.is_file()} == first


def test_card_block_goes_to_the_end_without_a_samples_heading():
    from amformers import model_card as report

    assert report.replace_card_block("# Card\n\ntext\n", "numbers") == (
        f"# Card\n\ntext\n\n{report.CARD_BEGIN}\nnumbers\n{report.CARD_END}\n"
    )
    with pytest.raises(ValueError, match="only one of"):
        report.replace_card_block(f"# Card\n{report.CARD_BEGIN}\n", "numbers")
