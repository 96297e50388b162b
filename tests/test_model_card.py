"""The model card a user reads first: rendered from a saved folder's own files, with how to load the model with and
without the package, what `generate()` does by default and the transformers releases it was tested with; and the
shipped cards are what the template renders today."""

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from amformers import AttnStreamConfig, AttnStreamForCausalLM
from amformers.model_card import CARD_BEGIN, CARD_END, TESTED_TRANSFORMERS, main, write_cards
from amformers.train.config import load_config
from amformers.train.export import generation_config_for, write_folder_card

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["attn_stream-8m", "attn_stream-baseline-8m", "palimpsa-8m", "notpalimpsa-8m"]


@pytest.fixture
def tiny_run(tmp_path, tiny_tokenizer):
    """A finished pretraining run folder of a tiny AttnStream, as the pretraining export leaves it (no card yet)."""
    folder = tmp_path / "tiny-run"
    config = load_config(REPO / "train" / "configs" / "tiny-attn_stream.yaml")
    model_config = AttnStreamConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64)  # fmt: skip
    model = AttnStreamForCausalLM(model_config)
    model.generation_config = generation_config_for(tiny_tokenizer, config["generation"])
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    (folder / "train_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    block = config["data"]["block_size"] * config["training"]["batch_size"]
    records = [{"type": "train", "step": s, "tokens": s * block, "loss": 5.0 - s} for s in (1, 2)]
    records.append({"type": "eval", "step": 2, "val_loss": 2.5})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "samples.json").write_text(json.dumps([{"prompt": "Once upon a time", "completion": " a cat."}]))
    return folder, model, config


def test_a_rendered_card_tells_how_to_load_and_what_generate_does(tiny_run):
    folder, model, config = tiny_run
    repo_id = "someone/tiny"  # the card shows how to load the pushed repo; nothing is downloaded here
    card = ModelCard.load(write_folder_card(folder, repo_id=repo_id))
    text = card.text
    assert "import amformers  # registers `attn_stream`" in text
    assert f'AutoModelForCausalLM.from_pretrained("{repo_id}")\n' in text
    assert f'AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)' in text
    generation = config["generation"]
    assert generation["do_sample"]
    assert (
        f"`generation_config.json` makes `generate()` **sample** by default: temperature {generation['temperature']}, "
        f"top-k\n{generation['top_k']}" in text
    )
    assert "do_sample=False" in text
    assert f"transformers {TESTED_TRANSFORMERS['oldest']}" in text and TESTED_TRANSFORMERS["newest"] in text
    parameters = model.num_parameters()
    assert f"**{parameters:,} parameters**" in text
    assert f"**{2 * config['data']['block_size'] * config['training']['batch_size']:,} training tokens**" in text
    assert "Held-out validation loss **2.5000**" in text and "not\ncherry-picked" in text
    assert "Do not use it as an assistant" in text and "arXiv:2412.15113" in text
    assert text.count(CARD_BEGIN) == text.count(CARD_END) == 1
    assert card.data.eval_results[0].metric_value == pytest.approx(12.1825, abs=1e-4)  # exp(2.5)


def test_a_greedy_generation_config_is_described_as_greedy(tiny_run):
    folder, _, _ = tiny_run
    saved = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**saved, "do_sample": False}))
    text = write_folder_card(folder).read_text()
    assert "decode **greedily** by default" in text and "**sample** by default" not in text


def test_render_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stop:
        main(["--render", str(tmp_path / "empty")])
    assert stop.value.code == 2
    assert "lacks train_config.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--results", str(tmp_path)])  # --checkpoints missing


def test_tested_transformers_floor_is_the_locked_release():
    locked = re.search(r"^transformers==(\S+)$", (REPO / "requirements" / "lock.txt").read_text(), re.MULTILINE)
    assert locked and locked.group(1) == TESTED_TRANSFORMERS["oldest"]


def test_shipped_cards_are_what_the_template_renders(tmp_path, monkeypatch):
    """Re-rendering each shipped checkpoint's card (from its files, then its evaluation block from the shipped
    results) reproduces README.md byte for byte: regenerate with the commands in checkpoints/README.md."""
    monkeypatch.chdir(tmp_path)
    for name in SHIPPED:
        source, copy = REPO / "checkpoints" / name, Path("checkpoints") / name
        copy.mkdir(parents=True)
        for path in source.iterdir():
            if path.suffix != ".safetensors":  # the card reads the config, not the weights
                shutil.copy2(path, copy / path.name)
    main(["--render", *(f"checkpoints/{name}" for name in SHIPPED)])
    write_cards("checkpoints", REPO / "experiments" / "model_eval" / "results")
    for name in SHIPPED:
        assert (Path("checkpoints") / name / "README.md").read_text() == (
            REPO / "checkpoints" / name / "README.md"
        ).read_text(), f"checkpoints/{name}/README.md is stale: re-render it (checkpoints/README.md)"
