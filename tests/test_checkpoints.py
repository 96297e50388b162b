"""The shipped 8M checkpoints (checkpoints/<name>/): they load, write English rather than noise, and reproduce the
evaluation numbers stored beside them."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import amformers  # noqa: F401  (registers the families)
from amformers.eval.perplexity import TINYSTORIES_VALID, evaluate_documents, read_stories
from amformers.modeling.remote_code import flatten_module_sources

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
# The checkpoints this commit ships, each trained by train/configs/<name>.yaml (see checkpoints/README.md).
SHIPPED = ("attn_stream-8m", "attn_stream-baseline-8m", "palimpsa-8m", "notpalimpsa-8m")
MAX_BYTES = 40_000_000
# The shipped models score TinyStories' validation stories at 21-23 (their training mix is ~90% books); an untrained
# model (uniform over 8,192 tokens) scores ~8,192, and one that only learned unigram frequencies several hundred.
PERPLEXITY_BOUND = 40.0


@pytest.fixture(scope="module", params=SHIPPED)
def shipped(request):
    folder = CHECKPOINTS / request.param
    assert (folder / "config.json").is_file(), f"{folder} is missing: the checkpoint is listed as shipped"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return folder, model, tokenizer


def test_checkpoint_folder_is_complete_and_small(shipped):
    folder, model, _ = shipped
    for name in ("model.safetensors", "generation_config.json", "tokenizer.json", "README.md", "training_curve.png"):
        assert (folder / name).is_file(), name
    assert (folder / "model.safetensors").stat().st_size <= MAX_BYTES
    assert not (folder / "checkpoints").exists() and not list(folder.glob("*.bin"))  # no optimizer states
    summary = json.loads((folder / "training_summary.json").read_text())
    assert summary["tokens"] >= 8_000_000 and summary["model_type"] == model.config.model_type
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "model-index" in card and "license: apache-2.0" in card


def test_checkpoint_writes_words_not_noise(shipped):
    """Greedy continuation of a story opening: almost every word is one TinyStories uses."""
    _, model, tokenizer = shipped
    vocabulary = set(re.findall(r"[a-z]+", TINYSTORIES_VALID.read_text(encoding="utf-8").lower()))
    inputs = tokenizer("Once upon a time", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=48)
        uncached = model.generate(**inputs, do_sample=False, max_new_tokens=48, use_cache=False)
    assert torch.equal(output, uncached), "cached decoding differs from recomputing the whole prefix"
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    words = re.findall(r"[a-z]+", text.lower())
    assert len(words) >= 20 and len(set(words)) >= 10, text  # a sentence, not one word repeated
    known = sum(word in vocabulary for word in words) / len(words)
    assert known >= 0.9, f"{known:.0%} known words: {text!r}"


def test_checkpoint_reproduces_its_stored_perplexity(shipped):
    folder, model, tokenizer = shipped
    stored = json.loads((folder / "eval_results.json").read_text())["tinystories_valid_perplexity"]
    stories = read_stories(TINYSTORIES_VALID)
    with torch.no_grad():
        measured = evaluate_documents(model, tokenizer, stories)["perplexity"]
    assert math.isclose(measured, stored, rel_tol=1e-3), f"measured {measured:.4f}, stored {stored:.4f}"
    assert measured < PERPLEXITY_BOUND


REMOTE_SCRIPT = r"""
import sys
class BlockAmformers:  # what a Hub user without the package has: only the checkpoint's own code files
    def find_spec(self, name, path=None, target=None):
        if name == "amformers" or name.startswith("amformers."):
            raise ImportError("amformers is blocked in this process")
sys.meta_path.insert(0, BlockAmformers())
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
assert "amformers" not in type(model).__module__, type(model).__module__
prompt = torch.tensor([[1, 50, 60, 70, 80]])
with torch.no_grad():
    cached = model.generate(prompt, do_sample=False, max_new_tokens=12)
    uncached = model.generate(prompt, do_sample=False, max_new_tokens=12, use_cache=False)
    assert torch.equal(cached, uncached), (cached, uncached)
    torch.save(model(prompt).logits, sys.argv[2])
"""


def test_checkpoint_code_is_the_current_source(shipped):
    """The remote code shipped beside the weights is the package's current source, flattened (after changing the
    models: `python -m amformers.train.ship --refresh-code checkpoints/*/`)."""
    folder, model, _ = shipped
    expected = flatten_module_sources(sys.modules[type(model).__module__].__file__)
    shipped_code = {path.name: path.read_text(encoding="utf-8") for path in folder.glob("*.py")}
    assert sorted(shipped_code) == sorted(expected)
    stale = [name for name in expected if shipped_code[name] != expected[name]]
    assert not stale, f"{folder.name}: stale remote code {stale}"


def test_checkpoint_loads_with_remote_code_alone(shipped, tmp_path):
    folder, model, _ = shipped
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = tmp_path / "logits.pt"
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(folder), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = model(torch.tensor([[1, 50, 60, 70, 80]])).logits
    torch.testing.assert_close(torch.load(out), expected)
