"""MQAR data (eval/mqar.py) against zoology's semantics, checked example by example."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from experiments.mqar.task import accuracy, mqar, split_seed


def test_mqar_sequences_follow_zoology():
    vocab, length, kv = 64, 32, 4
    inputs, labels = mqar(200, length, kv, vocab_size=vocab, seed=0)
    assert inputs.shape == labels.shape == (200, length)
    for x, y in zip(inputs.tolist(), labels.tolist()):
        keys, values = x[0 : 2 * kv : 2], x[1 : 2 * kv : 2]
        assert len(set(keys)) == kv and all(1 <= k < vocab // 2 for k in keys)
        assert len(set(values)) == kv and all(vocab // 2 <= v < vocab for v in values)
        pairs = dict(zip(keys, values))
        asked = [t for t in range(length) if y[t] != -100]
        assert len(asked) == kv
        assert all(t >= 2 * kv and (t - 2 * kv) % 2 == 0 for t in asked)  # queries sit at even region offsets
        assert sorted(x[t] for t in asked) == sorted(keys)  # every key is asked once
        assert all(y[t] == pairs[x[t]] for t in asked)  # target = the value paired with the key just read
        region = [x[t] for t in range(2 * kv, length) if t not in asked]
        assert region == [0] * len(region)  # random_non_queries=False leaves fillers at 0


def test_mqar_gaps_favour_short_distances_and_splits_are_disjoint():
    inputs, labels = mqar(2000, 256, 16, seed=1)
    offsets = ((labels != -100).nonzero()[:, 1] - 32) // 2
    # power law a = 0.01 over 112 gaps: the first quarter of the region holds most queries
    assert (offsets < 28).float().mean() > 0.4
    assert split_seed("train") < 2**30 <= split_seed("test")
    a, _ = mqar(4, 64, 4, seed=split_seed("train"))
    b, _ = mqar(4, 64, 4, seed=split_seed("test"))
    assert not torch.equal(a, b)
    again, _ = mqar(4, 64, 4, seed=split_seed("train"))
    assert torch.equal(a, again)


def test_mqar_random_non_queries_and_errors():
    inputs, labels = mqar(50, 64, 4, vocab_size=128, random_non_queries=True, seed=2)
    assert (inputs[:, 8:] != 0).float().mean() > 0.9
    with pytest.raises(ValueError, match="even"):
        mqar(1, 63, 4)
    with pytest.raises(ValueError, match="seq_len"):
        mqar(1, 16, 8)


def test_mqar_accuracy_is_per_example_mean():
    labels = torch.tensor([[-100, 5, -100, 6], [-100, 7, -100, -100]])
    logits = torch.zeros(2, 4, 10)
    logits[0, 1, 5] = logits[0, 3, 1] = logits[1, 1, 7] = 1.0  # example 0: 1/2 right, example 1: 1/1 right
    assert accuracy(logits, labels) == pytest.approx(0.75)
    assert np.isclose(accuracy(logits, torch.full((2, 4), -100)), 0.0)


def test_sweep_trains_a_tiny_attention_model_and_measures_like_zoology(tmp_path):
    from experiments.mqar import sweep as mqar_sweep

    model = mqar_sweep.build_model("attention", 32, 32, vocab_size=64)
    assert all(isinstance(layer.mlp, mqar_sweep.NoMLP) for layer in model.model.layers)
    x, y = mqar(16, 32, 4, vocab_size=64, seed=3)
    with torch.no_grad():
        reference = accuracy(model(input_ids=x).logits, y)  # every position's logits, zoology's metric
    assert mqar_sweep.evaluate(model, x, y, batch_size=5) == pytest.approx(reference)
    assert mqar_sweep.recurrent_state_size(model, "attention", 32) == 2 * 2 * 32 * 32

    mqar_sweep.run_sweep(["attn_values"], [32], [(32, 4)], [3e-3], 64, 32, 2, 32, [0], tmp_path, vocab_size=64)
    (run,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert run["family"] == "attn_values" and run["steps"] == 4 and 0.0 <= run["test_accuracy"] <= 1.0
    summary = mqar_sweep.summarise(tmp_path / "results.jsonl", tmp_path / "mqar.json")
    assert summary["best_over_lr"][0]["state_size"] == run["state_size"]
    assert summary["config"]["vocab_size"] == 64

    longer = {**run, "key": run["key"] + "-L64", "seq_len": 64, "config": {**run["config"], "vocab_size": 128}}
    with (tmp_path / "results.jsonl").open("a") as handle:  # a second task whose vocabulary is wider
        handle.write(json.dumps(longer) + "\n")
    summary = mqar_sweep.summarise(tmp_path / "results.jsonl", tmp_path / "mqar.json")
    assert "vocab_size" not in summary["config"] and summary["config"]["epochs"] == 2
    assert summary["vocab_size_by_seq_len"] == {"32": [64], "64": [128]}


@pytest.mark.parametrize("family", ["palimpsa", "not_palimpsa", "meta_mamba2", "mamba2"])
def test_sweep_builds_every_recurrent_family_without_mlp(family):
    from experiments.mqar import sweep as mqar_sweep

    model = mqar_sweep.build_model(family, 32, 32, vocab_size=64)
    if model is None:
        pytest.skip("PalimpsaConfig is not available")
    assert model.config.num_hidden_layers == 2 and model.config.intermediate_size == 0
    assert model.config.metaplastic == (family in ("palimpsa", "meta_mamba2"))
    per_state = 2 * model.config.num_heads * 16 * 32  # 2 layers x heads x d_k 16 x d_v 32
    expected = per_state * (2 if model.config.metaplastic else 1)
    assert mqar_sweep.recurrent_state_size(model, family, 32) == expected
    x, y = mqar(2, 32, 4, vocab_size=64, seed=0)
    logits, targets = mqar_sweep.asked_logits(model, x, y)
    assert logits.shape == (8, 64) and targets.shape == (8,)


def test_claim_comparisons_match_peers_by_state_size_and_by_width():
    from experiments.mqar.sweep import claim_comparisons

    def row(family, d, state, acc):
        return {"family": family, "d_model": d, "state_size": state, "best_test_accuracy": acc, "seq_len": 128,
                "kv_pairs": 16, "seed": 0}  # fmt: skip

    rows = [row("palimpsa", 64, 8192, 0.5), row("not_palimpsa", 64, 4096, 0.2), row("not_palimpsa", 128, 8192, 0.4)]
    found = {(c["match"], c["peer_d_model"]): c["difference"] for c in claim_comparisons(rows)}
    assert found == {("equal state size", 128): pytest.approx(0.1), ("equal d_model", 64): pytest.approx(0.3)}
    other_task = [{**r, "seq_len": 256} if r["family"] == "not_palimpsa" else r for r in rows]
    assert claim_comparisons(other_task) == []  # peers on another task are never compared


def test_seed_spread_summarises_only_cells_with_several_seeds():
    from experiments.mqar.sweep import seed_spread

    def row(family, seed, acc):
        cell = {"family": family, "d_model": 64, "seq_len": 128, "kv_pairs": 16}
        return {**cell, "seed": seed, "best_test_accuracy": acc}

    (cell,) = seed_spread([row("palimpsa", 0, 0.2), row("palimpsa", 1, 0.6), row("mamba2", 0, 0.9)])
    assert cell["family"] == "palimpsa" and cell["seeds"] == 2
    assert cell["mean_accuracy"] == pytest.approx(0.4) and cell["std_accuracy"] == pytest.approx(0.2 * 2**0.5)
    assert (cell["min_accuracy"], cell["max_accuracy"]) == (0.2, 0.6)


def test_concurrent_sweeps_skip_cells_another_live_process_claimed(tmp_path):
    import os

    from experiments.mqar import sweep as mqar_sweep

    claims = tmp_path / "claims"
    claims.mkdir()
    taken = mqar_sweep.run_key("attention", 32, 32, 4, 3e-3, 0)
    (claims / taken).write_text(str(os.getppid()))  # a live process (pytest's parent) trains this cell
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = mqar_sweep.run_key("attn_values", 32, 32, 4, 3e-3, 0)
    (claims / stale).write_text(dead.stdout.strip())  # a crashed sweep left this claim behind
    mqar_sweep.run_sweep(["attention", "attn_values"], [32], [(32, 4)], [3e-3], 32, 16, 1, 32, [0], tmp_path, 64)
    runs = [json.loads(line)["key"] for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert runs == [stale]  # the stale claim was taken over, the live one respected
    assert not (claims / stale).exists() and (claims / taken).exists()


def test_default_grid_tasks_are_all_generable_and_bad_tasks_fail_before_training(tmp_path):
    from experiments.mqar import sweep as mqar_sweep

    for seq_len, kv in mqar_sweep.DEFAULT_TASKS:  # the L=256 task once crashed the sweep hours in (vocab 256)
        inputs, _ = mqar(2, seq_len, kv, mqar_sweep.task_vocab(seq_len), seed=0)
        assert inputs.max() < mqar_sweep.task_vocab(seq_len)
    assert mqar_sweep.task_vocab(256) == 512 and mqar_sweep.task_vocab(128) == 256
    assert mqar_sweep.task_vocab(256, vocab_size=8192) == 8192
    tasks = [(32, 4), (32, 16)]
    with pytest.raises(ValueError, match="key-value pairs"):
        mqar_sweep.run_sweep(["attention", "attn_values"], [32], tasks, [3e-3], 64, 32, 1, 32, [0], tmp_path)
    assert not (tmp_path / "results.jsonl").exists()  # nothing trained before the bad task was caught


def test_attention_families_default_to_one_head_as_wide_as_the_model():
    from experiments.mqar import sweep as mqar_sweep

    for family in ("attention", "attn_values"):
        config = mqar_sweep.build_model(family, 64, 32, vocab_size=64).config
        assert (config.num_attention_heads, config.head_dim) == (1, 64)  # zoology's Figure-2 MHA layout
    narrow = mqar_sweep.build_model("attention", 64, 32, vocab_size=64, heads=4, attention_dropout=0.1).config
    assert (narrow.num_attention_heads, narrow.head_dim, narrow.attention_dropout) == (4, 16, 0.1)
    recurrent = mqar_sweep.build_model("palimpsa", 64, 32, vocab_size=64)
    if recurrent is not None:  # the official Palimpsa MQAR layout: heads of key dim 16
        assert (recurrent.config.num_heads, recurrent.config.head_dim) == (4, 16)


def test_harness_validation_runs_resumes_and_summarises(tmp_path, capsys):
    from experiments.mqar import validate

    settings = dict(tasks=[(32, 4)], d_models=(32,), lrs=(1e-3, 3e-3), epochs=1, train_examples=32,
                    test_examples=16, batch_size=16, out_dir=tmp_path)  # fmt: skip
    validate.run_validation(**settings)
    assert "  solve-d32-h1-L32-kv4-V256-lr1.00e-03-e1-s0 {'epoch': 1, 'step': 2," in capsys.readouterr().out  # progress
    runs = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    solve = [r for r in runs if r["part"] == "solve"]
    assert [r["lr"] for r in solve] == [1e-3, 3e-3]  # neither solved in 2 steps: every lr was tried
    ablation = [r for r in runs if r["part"] == "ablation"]
    assert [(r["config"]["heads"], r["lr"]) for r in ablation] == [(4, 3e-3), (4, 1e-3), (1, 3e-3), (1, 1e-3)]
    assert all(r["config"]["attention_dropout"] == 0.1 and r["config"]["vocab_size"] == 256 for r in runs)
    validate.run_validation(**settings)  # resumes: nothing left to train
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(runs)

    summary = validate.summarise_validation(tmp_path / "results.jsonl", tmp_path / "harness_validation.json", "cmd")
    (verdict,) = summary["verdicts"]
    assert (verdict["seq_len"], verdict["kv_pairs"], verdict["vocab_size"], verdict["runs"]) == (32, 4, 256, 2)
    assert verdict["solved"] == (verdict["best_test_accuracy"] >= 0.99)
    assert summary["validated_tasks"] == {"32x4": verdict["solved"]}
    assert summary["runs"][0]["history"][0]["step"] == 2 and summary["command"] == "cmd"
    assert json.loads((tmp_path / "harness_validation.json").read_text())["cpu_seconds_total"] > 0

    from experiments.mqar.report import section

    lines = section(tmp_path)  # no mqar.json here: the validation section alone
    assert lines[0] == "## MQAR harness validation" and (tmp_path / "harness_validation.png").is_file()
    assert f"32x4 {'solved' if verdict['solved'] else 'NOT solved'}" in lines[2]
    assert "\n".join(lines).count("\n| 4 | 16 |") == 2  # the ablation's two rows of 4 heads of 16


def test_validation_stops_trying_lrs_once_a_task_is_solved(tmp_path, monkeypatch):
    from experiments.mqar import validate

    tried = []

    def fake_train_one(family, d_model, seq_len, kv, lr, **kwargs):
        tried.append(lr)
        acc = 0.995 if lr == 2e-3 else 0.1
        return {"family": family, "d_model": d_model, "seq_len": seq_len, "kv_pairs": kv, "lr": lr, "seed": 0,
                "best_test_accuracy": acc, "test_accuracy": acc, "steps": 1, "seconds": 0.0, "cpu_seconds": 0.0,
                "config": {"vocab_size": kwargs["vocab_size"], "heads": 1}, "history": []}  # fmt: skip

    monkeypatch.setattr(validate, "train_one", fake_train_one)
    validate.run_validation(tasks=[(32, 4)], d_models=(32,), lrs=(1e-3, 2e-3, 5e-4), ablation=False, out_dir=tmp_path)
    assert tried == [1e-3, 2e-3]
    summary = validate.summarise_validation(tmp_path / "results.jsonl", tmp_path / "v.json")
    assert summary["validated_tasks"] == {"32x4": True} and summary["verdicts"][0]["lr"] == 2e-3


def test_validation_ablation_reuses_a_solve_run_with_the_same_settings(tmp_path, monkeypatch):
    from experiments.mqar import validate

    tried = []

    def fake_train_one(family, d_model, seq_len, kv, lr, **kwargs):
        tried.append((kwargs["model_kwargs"]["heads"], lr))
        return {"family": family, "d_model": d_model, "seq_len": seq_len, "kv_pairs": kv, "lr": lr, "seed": 0,
                "best_test_accuracy": 0.5, "test_accuracy": 0.5, "steps": 1, "seconds": 1.0, "cpu_seconds": 1.0,
                "config": {"vocab_size": kwargs["vocab_size"], "heads": kwargs["model_kwargs"]["heads"],
                           "epochs": kwargs["epochs"]},
                "history": []}  # fmt: skip

    monkeypatch.setattr(validate, "train_one", fake_train_one)
    validate.run_validation(tasks=[(128, 8)], d_models=(64,), lrs=(1e-3,), epochs=4, out_dir=tmp_path)
    assert tried == [(1, 1e-3), (4, 3e-3), (4, 1e-3), (1, 3e-3)]  # one head at 1e-3 was the solve run: not again
    summary = validate.summarise_validation(tmp_path / "results.jsonl", tmp_path / "v.json")
    assert len(summary["runs"]) == 5 and summary["cpu_seconds_total"] == 4.0  # the reused run is counted once
    (reused,) = [r for r in summary["runs"] if r["reused"]]
    assert reused["part"] == "ablation" and reused["reused"] == "solve-d64-h1-L128-kv8-V256-lr1.00e-03-e4-s0"
    tried.clear()
    validate.run_validation(tasks=[(128, 8)], d_models=(64,), lrs=(3e-3,), epochs=8, out_dir=tmp_path / "longer")
    assert tried == [(1, 3e-3), (4, 3e-3), (4, 1e-3), (1, 3e-3), (1, 1e-3)]  # solve ran 8 epochs, the ablation 4


def test_report_flags_attention_rows_trained_with_the_old_head_layout(tmp_path):
    from experiments.mqar.report import grid_section

    def row(family, config):
        return {
            "family": family,
            "d_model": 64,
            "seq_len": 128,
            "kv_pairs": 16,
            "seed": 0,
            "state_size": 1,
            "best_test_accuracy": 0.1,
            "lr": 3e-3,
            "lrs_tried": 1,
            "steps": 1,
            "seconds": 1.0,
            "config": config,
        }

    data = {"runs": 2, "command": "c", "config": {}, "best_over_lr": [row("attention", {}), row("palimpsa", {})]}
    (tmp_path / "mqar.json").write_text(json.dumps(data))
    assert any("1 attention rows above were trained before" in line for line in grid_section(tmp_path))
    data["best_over_lr"][0]["config"] = {"heads": 1}
    (tmp_path / "mqar.json").write_text(json.dumps(data))
    assert not any("trained before" in line for line in grid_section(tmp_path))
