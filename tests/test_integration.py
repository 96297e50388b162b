"""What every model family must do through the real libraries, written once and run for each family.

`from_pretrained` through remote code without the package, the text-generation pipeline, Trainer, gradient
checkpointing, PEFT LoRA and lm-eval's HFLM: the assertions are the behaviour users rely on, so they are the same
for AttnStream and Palimpsa (and for Palimpsa's Mamba2 mixer where the layer differs). Each family's own behaviour
(its equations, caches, configs) is tested in test_attn_stream.py and test_palimpsa_model.py.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import TOKENIZER_TEXT
from test_attn_stream import tiny_config as attn_stream_config
from test_attn_stream import tiny_model as attn_stream_model
from test_palimpsa_model import VARIANTS as PALIMPSA_VARIANTS
from test_palimpsa_model import tiny_config as palimpsa_config
from test_palimpsa_model import tiny_model as palimpsa_model
from transformers import AutoModelForCausalLM

from amformers import AttnStreamForCausalLM, PalimpsaForCausalLM

# family -> (tiny model with trained-looking weights, fresh model with a small init for training, the files its
# remote code must ship)
FAMILIES = {
    "attn_stream": (
        lambda: attn_stream_model(attention_stream="queries", stream_weighting="learned"),
        lambda: AttnStreamForCausalLM(attn_stream_config(initializer_range=0.02, stream_weighting="learned")),
        ("modeling_attn_stream.py", "configuration_attn_stream.py", "remote_code.py", "input_checks.py"),
    ),
    "palimpsa": (
        palimpsa_model,
        lambda: PalimpsaForCausalLM(palimpsa_config(initializer_range=0.02)),
        (
            "modeling_palimpsa.py",
            "configuration_palimpsa.py",
            "palimpsa.py",
            "palimpsa_chunk.py",
            "palimpsa_cpu.py",
            "palimpsa_triton.py",
        ),
    ),
    "meta_mamba2": (
        lambda: palimpsa_model(**PALIMPSA_VARIANTS["meta_mamba2"]),
        lambda: PalimpsaForCausalLM(palimpsa_config(initializer_range=0.02, **PALIMPSA_VARIANTS["meta_mamba2"])),
        ("modeling_palimpsa.py", "configuration_palimpsa.py", "palimpsa.py", "palimpsa_chunk.py"),
    ),
}
# PEFT targets per family: the attention-style names, and transformers' "all-linear".
LORA_TARGETS = {"attn_stream": ["q_proj", "v_proj"], "palimpsa": ["q_proj", "v_proj"], "meta_mamba2": ["in_proj"]}


def ids(batch=2, length=11, vocab=320, seed=1):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------
# Remote code: a saved folder loads with trust_remote_code=True in a process where amformers cannot be imported

REMOTE_SCRIPT = r"""
import sys
class BlockAmformers:
    def find_spec(self, name, path=None, target=None):
        if name == "amformers" or name.startswith("amformers."):
            raise ImportError("amformers is blocked in this process")
sys.meta_path.insert(0, BlockAmformers())
try:
    import amformers  # noqa
    raise SystemExit("amformers should not be importable here")
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
assert "amformers" not in type(model).__module__, type(model).__module__
x = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(x).logits, sys.argv[3])
    generated = model.generate(x[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
model.save_pretrained(sys.argv[1] + "-resaved")
print("OK", type(model).__module__, len(tok), tuple(generated.shape))
"""


@pytest.mark.parametrize("family", ["attn_stream", "palimpsa"])
def test_trust_remote_code_loads_without_the_package(family, tmp_path, tiny_tokenizer):
    make_model, _, files = FAMILIES[family]
    model = make_model()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    for name in files:
        assert (model_dir / name).is_file(), name
    x = ids()
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-I", "-c", REMOTE_SCRIPT, str(model_dir), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK transformers_modules" in result.stdout and "(2, 7)" in result.stdout
    with torch.no_grad():  # float32 rounding apart: a remote-code copy has no C++ source, so Palimpsa runs chunked
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), model(x).logits, atol=1e-5, rtol=1e-5)
    # a model loaded through remote code saves a folder that loads again (here with the package)
    resaved = AutoModelForCausalLM.from_pretrained(f"{model_dir}-resaved").eval()
    with torch.no_grad():
        torch.testing.assert_close(resaved(x).logits, model(x).logits, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# pipeline, Trainer, gradient checkpointing


@pytest.mark.parametrize("family", ["attn_stream", "palimpsa"])
def test_text_generation_pipeline(family, tiny_tokenizer):
    from transformers import pipeline

    generator = pipeline("text-generation", model=FAMILIES[family][0](), tokenizer=tiny_tokenizer, device="cpu")
    prompts = ["Once upon a time", "The cat"]
    out = generator(prompts, max_new_tokens=8, do_sample=False, batch_size=2)
    for prompt, result in zip(prompts, out):
        text = result[0]["generated_text"]
        assert text.startswith(prompt) and len(text) > len(prompt)


def lm_examples(tokenizer, length=24):
    rows = []
    for text in TOKENIZER_TEXT[:5]:
        input_ids = tokenizer(text)["input_ids"][:length]
        input_ids += [tokenizer.pad_token_id] * (length - len(input_ids))
        labels = [t if t != tokenizer.pad_token_id else -100 for t in input_ids]
        rows.append({"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)})
    return rows


@pytest.mark.parametrize("family, steps, learning_rate", [("attn_stream", 25, 3e-3), ("palimpsa", 15, 1e-2)])
def test_trainer_reduces_loss(family, steps, learning_rate, tmp_path, tiny_tokenizer):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=5,
        learning_rate=learning_rate,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=FAMILIES[family][1](), args=args, train_dataset=lm_examples(tiny_tokenizer))
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("family", ["attn_stream", "palimpsa", "meta_mamba2"])
def test_gradient_checkpointing_gives_same_gradients(family):
    model = FAMILIES[family][0]().train()
    x = ids(2, 10)

    def grads():
        model.zero_grad()
        model(x, labels=x).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable()
    checkpointed = grads()
    assert model.model.gradient_checkpointing and plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["attn_stream", "palimpsa"])
def test_compiled_model_equals_eager(family):
    """`training.compile` trains `model.compile()`d models: the loss, logits and every gradient must be the eager
    ones (Palimpsa's chunked op with its hand-written backward included)."""
    from amformers.train.config import compile_model

    model = FAMILIES[family][0]().train()
    x = ids(2, 40)  # longer than one Palimpsa chunk

    def run():
        model.zero_grad()
        out = model(x, labels=x)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return out.loss.detach(), out.logits.detach(), grads

    loss, logits, grads = run()
    torch._dynamo.reset()  # nothing cached by earlier tests' compilations: this one compiles afresh
    why_not = compile_model(model, "cpu")
    if why_not is not None:
        pytest.skip(f"torch.compile cannot run on this machine: {why_not}")
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled_loss, compiled_logits, compiled_grads = run()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs_before  # compiled code ran, not eager
    torch.testing.assert_close(compiled_loss, loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled_logits, logits, atol=1e-4, rtol=1e-4)
    assert compiled_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(compiled_grads[name], grads[name], atol=1e-4, rtol=1e-4, msg=name)


def test_compile_falls_back_to_eager_where_it_cannot_run(monkeypatch):
    from amformers.train.config import compile_model

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nsecond line")

    monkeypatch.setattr(torch, "compile", no_compiler)
    model = FAMILIES["palimpsa"][0]()
    assert compile_model(model, "cpu") == "RuntimeError: no C++ compiler found"
    assert model._compiled_call_impl is None  # left eager, and it still runs
    assert torch.isfinite(model(ids(1, 5)).logits).all()


# --------------------------------------------------------------------------------------------------------------
# PEFT LoRA and lm-eval


@pytest.mark.parametrize("family", ["attn_stream", "palimpsa", "meta_mamba2"])
@pytest.mark.parametrize("targets", ["named", "all-linear"])
def test_peft_lora_trains_and_merges(family, targets):
    check_peft_lora_trains_and_merges(
        FAMILIES[family][0](), LORA_TARGETS[family] if targets == "named" else targets, ids(2, 9)
    )


@pytest.mark.parametrize("family", ["attn_stream", "palimpsa"])
def test_lm_eval_hflm_on_local_task(family, tmp_path, tiny_tokenizer):
    check_lm_eval_hflm_matches_own_scoring(FAMILIES[family][0](), tiny_tokenizer, tmp_path, f"tiny_{family}_choice")


MULTIPLE_CHOICE_DOCS = [
    {"context": "The cat sat on the", "choices": [" mat", " tree"], "label": 0},
    {"context": "Once upon a", "choices": [" time", " dog"], "label": 0},
    {"context": "Tom and Sam were", "choices": [" park", " friends"], "label": 1},
    {"context": "The bird sang a happy", "choices": [" song", " girl"], "label": 0},
]


def check_peft_lora_trains_and_merges(base, targets, input_ids):
    """LoRA trains (loss falls), changes the outputs, and `merge_and_unload` equals the adapted model."""
    from peft import LoraConfig, get_peft_model

    base_class = type(base)
    with torch.no_grad():
        before = base(input_ids).logits.clone()
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    first = None
    for _ in range(8):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        first = loss.item() if first is None else first
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < first
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=input_ids).logits
        assert (adapted - before).abs().max() > 1e-3
        merged = model.merge_and_unload()
        assert type(merged) is base_class
        torch.testing.assert_close(merged(input_ids).logits, adapted, atol=1e-4, rtol=1e-4)


def check_lm_eval_hflm_matches_own_scoring(model, tokenizer, tmp_path, task_name):
    """lm-eval's HFLM + simple_evaluate on a local JSONL multiple-choice task gives the accuracy we compute."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MULTIPLE_CHOICE_DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / f"{task_name}.yaml").write_text(
        f"task: {task_name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n"
        "metadata:\n  version: 1.0\n"
    )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, max_length=64)
    results = simple_evaluate(
        model=lm, tasks=[task_name], task_manager=TaskManager(include_path=str(tmp_path / "tasks"))
    )
    acc = results["results"][task_name]["acc,none"]

    def score(context, choice):  # summed log-probability of the choice after the context
        ctx = tokenizer(context)["input_ids"]
        full = tokenizer(context + choice)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([full])).logits.log_softmax(-1)[0]
        return sum(logp[i - 1, full[i]].item() for i in range(len(ctx), len(full)))

    expected = sum(
        max(range(2), key=lambda c, d=d: score(d["context"], d["choices"][c])) == d["label"]
        for d in MULTIPLE_CHOICE_DOCS
    ) / len(MULTIPLE_CHOICE_DOCS)
    assert acc == pytest.approx(expected)
