"""examples/finetune_babi_lora.py end to end on tiny random models of both families, on the real bAbI task 1 files."""

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import amformers
from amformers.eval.babi import default_dir, evaluate_task, parse_task
from amformers.eval.common import encode_pair, load_model
from amformers.eval.results import read_result

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "finetune_babi_lora.py"
spec = importlib.util.spec_from_file_location("finetune_babi_lora", SCRIPT)
finetune = importlib.util.module_from_spec(spec)
spec.loader.exec_module(finetune)

TINY_CONFIGS = {
    # max_position_embeddings below the longest tiny-tokenizer prompt, so left truncation is exercised
    "attn_stream": lambda: amformers.AttnStreamConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=96,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "palimpsa": lambda: amformers.PalimpsaConfig(
        vocab_size=320,
        hidden_size=32,
        num_hidden_layers=2,
        num_heads=2,
        head_dim=8,
        expand_v=1.5,
        intermediate_size=48,
        beta_rank=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
}
MODEL_CLASSES = {"attn_stream": amformers.AttnStreamForCausalLM, "palimpsa": amformers.PalimpsaForCausalLM}
REQUIRED_SETTINGS = {"task", "num_train", "num_test", "lora", "epochs", "num_candidates", "max_length", "prompt"}
REQUIRED_TRAINING = {"steps", "trainable_parameters", "total_parameters", "train_seconds", "train_loss_first"}


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and a busy machine cannot stall a thread waiting on its partner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny_model(family, folder, tokenizer) -> Path:
    torch.manual_seed(0)
    MODEL_CLASSES[family](TINY_CONFIGS[family]()).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_training_example_scores_only_the_answer_and_keeps_the_question(tiny_tokenizer):
    question = parse_task(finetune.task_split_files(default_dir(), 1)[0])[4]  # a story of 10 statements
    full = finetune.training_example(tiny_tokenizer, question, max_length=10_000)
    cut = finetune.training_example(tiny_tokenizer, question, max_length=40)
    _, answer_ids = encode_pair(tiny_tokenizer, finetune.prompt_for(question), " " + question["answer"])
    target = answer_ids + [tiny_tokenizer.eos_token_id]
    assert full["input_ids"][0] == tiny_tokenizer.bos_token_id and len(full["input_ids"]) > 40
    for example in (full, cut):
        assert [t for t in example["labels"] if t != -100] == target
        assert example["labels"][-len(target) :] == example["input_ids"][-len(target) :]
        assert len(example["input_ids"]) == len(example["labels"]) == len(example["attention_mask"])
    assert len(cut["input_ids"]) == 40 and cut["input_ids"] == full["input_ids"][-40:]
    assert tiny_tokenizer.decode(cut["input_ids"]).endswith(f"Question: {question['question']}\nAnswer: "
                                                            f"{question['answer']}<|endoftext|>")  # fmt: skip


# AttnStream takes its training length from max_position_embeddings (96); Palimpsa has none and is told one.
@pytest.mark.parametrize("family,max_length", [("attn_stream", None), ("palimpsa", 64)])
def test_finetune_babi_lora_end_to_end(family, max_length, tmp_path, tiny_tokenizer, one_thread):
    model_dir = save_tiny_model(family, tmp_path / f"tiny-{family}", tiny_tokenizer)
    adapter_dir, results = tmp_path / "adapter", tmp_path / "results" / "babi_lora.json"
    # One batch of 8 questions seen 4 times: the loss on the same batch must fall.
    argv = ["--model", str(model_dir), "--limit-train", "8", "--limit-test", "8", "--epochs", "4", "--batch-size",
            "8", "--lr", "2e-2", "--output-dir", str(adapter_dir), "--results", str(results)]  # fmt: skip
    if max_length:
        argv += ["--max-length", str(max_length)]
    finetune.main(argv)

    record = read_result(results)  # the amformers.eval.results schema
    settings, metrics, (training,) = record["settings"], record["metrics"], record["tables"]["training"]
    assert settings.keys() >= REQUIRED_SETTINGS and training.keys() >= REQUIRED_TRAINING
    assert (record["suite"], record["model"]) == ("babi_lora", model_dir.name)
    assert record["provenance"]["model_summary"]["model_type"] == family
    assert record["provenance"]["adapter_dir"] == str(adapter_dir.resolve())
    assert (settings["task"], settings["num_train"], settings["num_test"], settings["num_candidates"]) == (1, 8, 8, 6)
    assert metrics["babi_lora_chance"] == pytest.approx(1 / 6) and training["steps"] == 4
    assert settings["max_length"] == (max_length or 96)
    assert record["command"].startswith("python examples/finetune_babi_lora.py --model")
    assert training["train_loss_last"] < training["train_loss_first"]

    # Only the adapter is saved and only LoRA weights were trained; lora_B starts at zero, so nonzero means it learnt.
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["README.md", "adapter_config.json",
                                                             "adapter_model.safetensors"]  # fmt: skip
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert sum(t.numel() for t in adapter.values()) == training["trainable_parameters"]
    assert all(t.abs().max() > 0 for k, t in adapter.items() if ".lora_B." in k)

    # The saved adapter reproduces the reported accuracy, and merging it into the weights changes nothing.
    from peft import PeftModel

    base, tokenizer = load_model(model_dir)
    test_questions = parse_task(finetune.task_split_files(default_dir(), 1)[1])
    candidates = sorted({q["answer"] for q in test_questions})
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    unmerged = evaluate_task(peft_model, tokenizer, test_questions[:8], candidates)
    assert unmerged["accuracy"] == metrics["babi_lora_accuracy_after"]
    ids = torch.tensor([tokenizer(finetune.prompt_for(test_questions[0]))["input_ids"][:60]])
    with torch.no_grad():
        adapted_logits = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()
        assert type(merged) is MODEL_CLASSES[family]
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted_logits, atol=1e-4, rtol=1e-4)
    assert evaluate_task(merged, tokenizer, test_questions[:8], candidates)["accuracy"] == unmerged["accuracy"]


def test_missing_babi_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="bAbI folder .* does not exist"):
        finetune.main(["--model", str(tmp_path), "--data", str(tmp_path / "no-babi")])
    (tmp_path / "babi").mkdir()
    with pytest.raises(FileNotFoundError, match="No test file for bAbI task 3"):
        finetune.main(["--model", str(tmp_path), "--data", str(tmp_path / "babi"), "--task", "3"])


def test_training_length_comes_from_the_config_or_the_8m_block_size():
    assert finetune.block_size(TINY_CONFIGS["attn_stream"]()) == 96
    assert finetune.block_size(TINY_CONFIGS["palimpsa"]()) == 256
    assert finetune.block_size(TINY_CONFIGS["palimpsa"](), 1024) == 1024
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        finetune.block_size(TINY_CONFIGS["attn_stream"](), 128)
