"""Checks every model family must pass against the real libraries (PEFT, lm-eval), written once.

The test modules of each family call these with their own tiny models; the assertions are the
behaviour users rely on, so they must stay identical across families.
"""

import json

import pytest
import torch

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
