"""The language-model evaluation suites (amformers.eval) on a tiny random AttnStream and on models whose
logits we control, plus the lm-eval tasks through HFLM and through the lm-eval CLI."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from amformers import AttnStreamConfig, AttnStreamForCausalLM
from amformers.eval import babi, blimp, build_tasks, ioi, perplexity
from amformers.eval.__main__ import main as eval_main
from amformers.eval.common import document_nll, encode, prefix_token_id, score_continuations

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
    ioi_json = json.loads((res / "ioi.json").read_text())
    assert ioi_json["command"].startswith("python -m amformers.eval ioi --model")
    assert set(ioi_json["summary"]) == {"official", "wang-tinystories", "wang-wang"}
    assert ioi_json["summary"]["official"]["n"] == 2
    ppl = json.loads((res / "perplexity.json").read_text())["sources"]
    assert ppl["tinystories-valid"]["documents"] == 2 and "book:book" in ppl
    precision = json.loads((res / "precision.json").read_text())["result"]
    assert precision["passed"] and precision["top1_agreement"] > 0.5
    samples = json.loads((res / "generate.json").read_text())["samples"]
    assert len(samples) == 3 and all(s["greedy"] for s in samples)


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


def test_lm_eval_cli_runs_our_tasks_from_any_directory(tiny_model_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cli = Path(sys.executable).with_name("lm-eval")
    command = [
        str(cli) if cli.exists() else "lm-eval",
        "run",
        "--model", "hf",
        "--model_args", f"pretrained={tiny_model_dir},trust_remote_code=True",
        "--include_path", str(REPO / "eval" / "tasks"),
        "--tasks", "amformers_ioi",
        "--limit", "2",
        "--device", "cpu",
        "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result_files = list((tmp_path / "out").rglob("results*.json"))
    assert result_files, done.stdout[-2000:]
    acc = json.loads(result_files[0].read_text())["results"]["amformers_ioi"]["acc,none"]
    assert acc in (0.0, 0.5, 1.0)


def test_report_renders_tables_from_results_and_updates_only_the_readme_block(tiny_model_dir, tmp_path):
    from amformers.eval import amicl, report

    results = tmp_path / "results"
    amicl.main(["--trials", "20", "--seeds", "1", "--sweep-points", "3", "--out", str(results / "amicl.json")])
    eval_main(
        ["ioi", "--model", str(tiny_model_dir), "--limit", "2", "--per-template", "1", "--results-dir", str(results)]
    )
    from amformers.eval import icl_reddy

    for variant in ("baseline", "values"):
        icl_reddy.train(
            variant, 0, iterations=2, eval_every=2, test_size=8, batch_size=4, run_dir=tmp_path / f"runs/{variant}_s0"
        )
    icl_reddy.summarise(results / "icl_reddy.json", tmp_path / "runs")
    text = report.render(results)
    assert "| values | 1 |" in text and (results / "icl_reddy.png").is_file()
    ioi_json = json.loads((results / tiny_model_dir.name / "ioi.json").read_text())
    assert f"{ioi_json['summary']['official']['accuracy']:.4f}" in text
    assert "| 100 | 512 | 20 | 1.25 | 907 |" in text and (results / "amicl.png").is_file()
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nintro\n\n{report.README_BEGIN}\nold\n{report.README_END}\n\n## After\n")
    report.update_readme(text, readme)
    updated = readme.read_text()
    assert updated.startswith("# Title\n\nintro\n\n") and updated.endswith(f"{report.README_END}\n\n## After\n")
    assert "old" not in updated and "#### AMICL" in updated
