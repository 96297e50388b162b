"""The Accelerate pretraining loop at tiny scale: resume after kill -9, DDP == accumulation, checkpoints, Hub push."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import amformers
from amformers.train import checkpoints, loop, pretrain
from amformers.train.config import TRAINING_DEFAULTS, TRAINING_NULLABLE, build_model_config, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "train" / "configs"
needs_palimpsa = pytest.mark.skipif(
    not hasattr(amformers, "PalimpsaConfig"),
    reason="amformers has no PalimpsaConfig yet: the Palimpsa family is not merged",
)

# Long enough to cross an epoch (about 21 steps per epoch on the corpus below) and to be killed mid-run.
REFERENCE_STEPS = 24


def _stories(count: int) -> list[str]:
    import random

    rng = random.Random(0)
    names, things = ["Lily", "Tom", "Ben", "Sue", "Max", "Mia"], ["ball", "cake", "kite", "book", "hat", "boat"]
    return [
        f"Once upon a time, {rng.choice(names)} found a {rng.choice(things)} in the park. "
        f'{rng.choice(names)} said, "Let us play with the {rng.choice(things)}!" They were happy.'
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for name, stories in (("train.txt", _stories(120)), ("valid.txt", _stories(150)[120:])):
        (root / name).write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories), encoding="utf-8")
    return root


def tiny_config(folder: Path, corpus: Path, base: str = "tiny-attn_stream.yaml", **training) -> Path:
    """The shipped tiny config with its data pointed at the synthetic corpus and a private cache."""
    config = yaml.safe_load((CONFIGS / base).read_text())
    config["data"] = {
        "root": str(corpus),
        "block_size": 32,
        "cache_dir": str(corpus / "cache"),
        "sources": [{"path": "train.txt"}, {"path": "valid.txt", "split": "validation"}],
    }
    config["training"].update(training)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{Path(base).stem}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def subprocess_env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HOME=str(tmp / "hf_home"),  # no user-level accelerate config leaks into the launch
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",  # same thread count in every run (bitwise-equal losses), no oversubscription
    )
    return env


def run(args: list[str], tmp: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(args, env=subprocess_env(tmp), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def records(output: Path, kind: str) -> list[dict]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def pretrain_command(config: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "amformers.train.pretrain", "--config", str(config), "--output_dir", str(output)] + [
        *extra
    ]


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory) -> Path:
    """One process, micro-batches of 4, 2 accumulation steps: the run the others must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    config = tiny_config(tmp, corpus, gradient_accumulation_steps=2, save_every=4, save_total_limit=3)
    output = tmp / "out"
    run(pretrain_command(config, output, "--max_steps", str(REFERENCE_STEPS)), tmp)
    return output


@pytest.fixture()
def fresh_accelerate_state():
    """In-process runs share Accelerate's singletons; give each test a clean slate."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_reference_run_writes_everything(reference_run):
    train = records(reference_run, "train")
    assert [r["step"] for r in train] == list(range(1, REFERENCE_STEPS + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert sum(r["loss"] for r in train[-5:]) < sum(r["loss"] for r in train[:5])  # it learns
    lrs = [r["lr"] for r in train]
    assert max(lrs) == pytest.approx(3e-3) and lrs[-1] == pytest.approx(3e-4)  # warmup, cosine to 10%
    assert [r["step"] for r in records(reference_run, "eval")] == [10, 20, 24]
    summary = records(reference_run, "summary")[-1]
    assert summary["tokens_per_second"] > 0 and 0 <= summary["overhead_fraction"] < 1
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"):
        assert (reference_run / name).is_file(), name
    assert (reference_run / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in sorted((reference_run / "checkpoints").iterdir())] == [
        "step_00000016",
        "step_00000020",
        "step_00000024",
    ]
    samples = json.loads((reference_run / "samples.json").read_text())
    assert samples and samples[0]["prompt"] == "Once upon a time"


def test_kill_9_and_resume_reproduces_the_uninterrupted_run(reference_run, corpus, tmp_path):
    config = tiny_config(tmp_path, corpus, gradient_accumulation_steps=2, save_every=4, save_total_limit=3)
    output = tmp_path / "out"
    command = pretrain_command(config, output, "--max_steps", str(REFERENCE_STEPS))
    process = subprocess.Popen(command, env=subprocess_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics, first_checkpoint = output / "metrics.jsonl", output / "checkpoints" / "step_00000004"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and process.poll() is None:
            if first_checkpoint.is_dir() and metrics.is_file():
                steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"train"' in line]
                if steps and steps[-1] >= 6:
                    break
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
    finally:
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the run was not killed mid-way:\n{stderr.decode()[-2000:]}"
    logged = [line for line in metrics.read_text().splitlines() if line.endswith("}")]  # may end mid-line
    assert max(json.loads(line)["step"] for line in logged) < REFERENCE_STEPS

    run(command + ["--resume"], tmp_path)
    reference, resumed = records(reference_run, "train"), records(output, "train")
    assert [r["step"] for r in resumed] == list(range(1, REFERENCE_STEPS + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in reference]
    assert [r["val_loss"] for r in records(output, "eval")] == [r["val_loss"] for r in records(reference_run, "eval")]
    final, expected = load_file(output / "model.safetensors"), load_file(reference_run / "model.safetensors")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)


def test_two_process_ddp_matches_one_process_with_twice_the_accumulation(reference_run, corpus, tmp_path):
    config = tiny_config(tmp_path, corpus, gradient_accumulation_steps=1, save_every=12, save_total_limit=1)
    output = tmp_path / "ddp"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # `accelerate launch --cpu` alone starts one process (Accelerate 1.15 runs multi-CPU jobs through mpirun);
    # --multi_gpu makes it start 2 processes through torchrun, and the script's --cpu puts them on gloo.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(port)]  # fmt: skip
    command = pretrain_command(config, output, "--max_steps", str(REFERENCE_STEPS), "--cpu")[1:]
    run(launch + command, tmp_path)
    ddp, single = records(output, "train"), records(reference_run, "train")
    assert [r["step"] for r in ddp] == [r["step"] for r in single]
    assert records(output, "summary")[-1]["processes"] == 2
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in ddp]), torch.tensor([r["loss"] for r in single]), rtol=2e-5, atol=2e-5
    )
    torch.testing.assert_close(
        torch.tensor([r["val_loss"] for r in records(output, "eval")]),
        torch.tensor([r["val_loss"] for r in records(reference_run, "eval")]),
        rtol=2e-5,
        atol=2e-5,
    )
    assert (output / "checkpoints" / "step_00000024" / "random_states_1.pkl").is_file()  # each rank's RNG state


def _copy_run(reference_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(reference_run, copy)
    return copy


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "truncated or damaged: model.safetensors"),
        ("flip", "corrupt: the SHA-256 of optimizer.bin"),
        ("manifest", "not completely written"),
    ],
)
def test_damaged_checkpoint_is_refused(reference_run, corpus, tmp_path, damage, message):
    output = _copy_run(reference_run, tmp_path)
    latest = output / "checkpoints" / "step_00000024"
    if damage == "truncate":
        path = latest / "model.safetensors"
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "flip":
        path = latest / "optimizer.bin"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        (latest / checkpoints.CHECKPOINT_MANIFEST).unlink()
    config = tiny_config(tmp_path, corpus, gradient_accumulation_steps=2)
    with pytest.raises(checkpoints.CheckpointError, match=message):
        pretrain.main(["--config", str(config), "--output_dir", str(output), "--resume", "--max_steps", "30"])
    # an explicit older checkpoint still verifies
    checkpoints.verify_checkpoint(output / "checkpoints" / "step_00000020")


def test_existing_checkpoints_need_resume(reference_run, corpus, tmp_path):
    output = _copy_run(reference_run, tmp_path)
    config = tiny_config(tmp_path, corpus)
    with pytest.raises(checkpoints.CheckpointError, match="already holds checkpoints"):
        pretrain.main(["--config", str(config), "--output_dir", str(output)])
    # an interrupted save leaves only a hidden temporary folder, which is never taken for a checkpoint
    (output / "checkpoints" / ".step_00000028.tmp").mkdir()
    assert [s for s, _ in checkpoints.list_checkpoints(output / "checkpoints")] == [16, 20, 24]


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records the calls, 'uploads' into a local folder."""

    calls: list = []
    remote: Path | None = None

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        from huggingface_hub import RepoUrl

        FakeHfApi.calls.append(("create_repo", repo_id, private, exist_ok, repo_type))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None, ignore_patterns=None):
        from huggingface_hub.utils import filter_repo_objects

        FakeHfApi.calls.append(("upload_folder", repo_id, repo_type, commit_message))
        root = Path(folder_path)
        files = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, ignore_patterns=ignore_patterns):
            target = FakeHfApi.remote / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, target)


def test_push_to_hub_uploads_a_loadable_model(corpus, tmp_path, monkeypatch, fresh_accelerate_state):
    import huggingface_hub
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    FakeHfApi.calls, FakeHfApi.remote = [], tmp_path / "remote"
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    config = tiny_config(tmp_path, corpus, save_every=2, eval_every=3)
    output = tmp_path / "out"
    pretrain.main(["--config", str(config), "--output_dir", str(output), "--max_steps", "3", "--push_to_hub",
                   "--hub_model_id", "someone/tiny-attn-stream"])  # fmt: skip
    assert FakeHfApi.calls[0] == ("create_repo", "someone/tiny-attn-stream", False, True, "model")
    assert FakeHfApi.calls[1][:3] == ("upload_folder", "someone/tiny-attn-stream", "model")
    remote = FakeHfApi.remote
    assert not (remote / "checkpoints").exists()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
                 "training_curve.png", "metrics.jsonl", "modeling_attn_stream.py"):  # fmt: skip
        assert (remote / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(str(remote)).eval()
    local = AutoModelForCausalLM.from_pretrained(str(output)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(remote))
    inputs = tokenizer("Once upon a time", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, local(**inputs).logits, rtol=0, atol=0)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 2
    card = ModelCard.load(remote / "README.md")
    assert card.data.license == "apache-2.0" and "roneneldan/TinyStories" in card.data.datasets
    assert card.data.eval_results[0].metric_type == "perplexity"
    assert "someone/tiny-attn-stream" in card.text and "![training curve](training_curve.png)" in card.text


def _dry_run_parameters(path: Path, capsys) -> int:
    pretrain.main(["--config", str(path), "--dry_run"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("parameters: ")]
    assert len(lines) == 1
    return int(lines[0].split(": ")[1])


def test_dry_run_attn_stream_sizes(capsys):
    sizes = {name: _dry_run_parameters(CONFIGS / f"{name}.yaml", capsys) for name in (
        "attn_stream-8m", "attn_stream-baseline-8m", "attn_stream-1b", "attn_stream-baseline-1b")}  # fmt: skip
    assert 7.5e6 < sizes["attn_stream-8m"] < 9.5e6
    assert sizes["attn_stream-8m"] == sizes["attn_stream-baseline-8m"]  # fixed streams add no parameters
    for name in ("attn_stream-1b", "attn_stream-baseline-1b"):
        assert 0.9e9 <= sizes[name] <= 1.1e9, (name, sizes[name])


@needs_palimpsa
def test_dry_run_palimpsa_sizes(capsys):
    attn_8m = _dry_run_parameters(CONFIGS / "attn_stream-8m.yaml", capsys)
    for name in ("palimpsa-8m", "notpalimpsa-8m"):
        parameters = _dry_run_parameters(CONFIGS / f"{name}.yaml", capsys)
        assert abs(parameters - attn_8m) <= 0.1 * attn_8m, (name, parameters, attn_8m)
    for name in ("palimpsa-1b", "notpalimpsa-1b"):
        parameters = _dry_run_parameters(CONFIGS / f"{name}.yaml", capsys)
        assert 0.9e9 <= parameters <= 1.1e9, (name, parameters)


@needs_palimpsa
def test_tiny_palimpsa_trains_and_saves(corpus, tmp_path, fresh_accelerate_state):
    from transformers import AutoModelForCausalLM

    config = tiny_config(
        tmp_path, corpus, base="tiny-palimpsa.yaml", gradient_accumulation_steps=1, save_every=2, eval_every=2
    )
    output = tmp_path / "out"
    pretrain.main(["--config", str(config), "--output_dir", str(output), "--max_steps", "4"])
    train = records(output, "train")
    assert len(train) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    model = AutoModelForCausalLM.from_pretrained(str(output))
    assert model.config.model_type == "palimpsa"


@pytest.mark.parametrize("why_not", [None, "RuntimeError: no C++ compiler found"])
def test_compile_setting_compiles_or_says_why_not(
    why_not, corpus, tmp_path, monkeypatch, capsys, fresh_accelerate_state
):
    """`training.compile: true` hands the model to `compile_model` (held equal to eager in test_integration.py) on
    the run's device, and a machine that cannot compile trains eagerly and says so."""
    calls = []

    def fake_compile_model(model, device):
        calls.append((type(model).__name__, torch.device(device).type))
        return why_not

    monkeypatch.setattr(loop, "compile_model", fake_compile_model)
    config = tiny_config(tmp_path, corpus, gradient_accumulation_steps=1, save_every=0, eval_every=0, compile=True)
    output = tmp_path / "out"
    pretrain.main(["--config", str(config), "--output_dir", str(output), "--max_steps", "2"])
    assert calls == [("AttnStreamForCausalLM", "cpu")]
    expected = "model compiled with torch.compile" if why_not is None else f"torch.compile unavailable ({why_not})"
    assert expected in capsys.readouterr().out
    assert len(records(output, "train")) == 2


def test_accumulated_loss_is_token_exact(fresh_accelerate_state):
    """Micro-batches with different numbers of target tokens give the gradient of the full batch's mean loss."""
    import copy

    from accelerate import Accelerator
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "attn_stream", vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    model = AutoModelForCausalLM.from_config(config)
    reference = copy.deepcopy(model)
    tokens = torch.randint(0, 50, (4, 12))
    labels = tokens.clone()
    labels[0, 3:] = -100  # micro-batch 1 keeps 3 + 12 labels, micro-batch 2 keeps 12 + 6: unequal counts
    labels[3, :6] = -100
    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    model = accelerator.prepare(model)
    batches = [{"input_ids": tokens[:2], "labels": labels[:2]}, {"input_ids": tokens[2:], "labels": labels[2:]}]
    step_loss, _ = loop.accumulate_gradients(accelerator, model, batches)
    expected = reference(input_ids=tokens, labels=labels).loss
    expected.backward()
    torch.testing.assert_close(step_loss, expected.detach(), rtol=1e-6, atol=1e-6)
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-7, msg=name)
    # the naive average of the two micro-batch means is measurably different here
    with torch.no_grad():
        halves = [reference(input_ids=tokens[i : i + 2], labels=labels[i : i + 2]).loss for i in (0, 2)]
    assert abs((halves[0] + halves[1]).item() / 2 - expected.item()) > 1e-3


def test_validation_loss_is_the_models_loss_over_every_target(fresh_accelerate_state):
    """`evaluate` weighs every next-token target once, whatever the batching, and agrees with a direct
    cross-entropy over the shifted labels; the loop counts targets with the same shift."""
    import torch.nn.functional as F
    from accelerate import Accelerator
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "attn_stream", vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    tokens = torch.randint(0, 50, (5, 12))
    labels = tokens.clone()
    labels[1, 4:] = -100
    assert (loop.next_token_targets(labels) != -100).sum() == 4 * 11 + 3
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100).item()
    accelerator = Accelerator(cpu=True)
    rows = [{"input_ids": tokens[i : i + 2], "labels": labels[i : i + 2]} for i in range(0, 5, 2)]  # 2 + 2 + 1
    assert loop.evaluate(accelerator, accelerator.prepare(model), rows, None) == pytest.approx(expected, rel=1e-6)
    assert loop.evaluate(accelerator, model, rows[:1], 1) == pytest.approx(
        F.cross_entropy(logits[:2, :-1].flatten(0, 1), labels[:2, 1:].flatten(), ignore_index=-100).item(), rel=1e-6
    )


def test_data_dir_flag_sets_the_data_root(tmp_path, capsys):
    for flag in ("--data-dir", "--data_root"):  # the older spelling still works
        assert pretrain.parse_args(["--config", "c.yaml", flag, str(tmp_path)]).data_dir == str(tmp_path)
    assert pretrain.parse_args(["--config", "c.yaml"]).output_dir == str(Path("runs") / "c")  # under the cwd


def test_config_errors_are_clear(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model_type: attn_stream\ntraining: {learning_rat: 1}\n")
    with pytest.raises(ValueError, match="unknown key.*learning_rat"):
        load_config(path)
    path.write_text("model_type: not_a_family\nmodel: {}\n")
    with pytest.raises(ValueError, match="not registered"):
        build_model_config(load_config(path))
    with pytest.raises(ValueError, match="KEY=VALUE"):
        load_config(CONFIGS / "tiny-attn_stream.yaml", ["training.seed"])
    config = load_config(CONFIGS / "tiny-attn_stream.yaml", ["training.mixed_precision=no", "data.block_size=8"])
    assert config["training"]["mixed_precision"] == "no" and config["data"]["block_size"] == 8


def test_bad_values_and_unknown_model_keys_are_named(tmp_path):
    tiny = CONFIGS / "tiny-attn_stream.yaml"
    # every training key is type-checked: by its default's type, or as nullable
    assert set(TRAINING_NULLABLE) <= set(TRAINING_DEFAULTS)
    for key, default in TRAINING_DEFAULTS.items():
        if default is not None or key in TRAINING_NULLABLE:
            with pytest.raises(ValueError, match=rf"training\.{key} must be"):
                load_config(tiny, [f"training.{key}=[1]"])
    assert load_config(tiny, ["training.max_grad_norm=null"])["training"]["max_grad_norm"] is None
    with pytest.raises(ValueError, match=r"training\.batch_size must be an integer, got 'abc' \(str\)"):
        pretrain.main(["--config", str(tiny), "--set", "training.batch_size=abc", "--dry_run"])
    with pytest.raises(ValueError, match=r"training\.learning_rate must be a number, got 'fast'"):
        load_config(tiny, ["training.learning_rate=fast"])
    with pytest.raises(ValueError, match=r"training\.fused_adamw must be true or false, got 'maybe'"):
        load_config(tiny, ["training.fused_adamw=maybe"])
    with pytest.raises(ValueError, match=r"training\.eval_batch_size must be an integer or null, got 2\.5"):
        load_config(tiny, ["training.eval_batch_size=2.5"])
    config = load_config(tiny, ["training.learning_rate=1e-3", "training.eval_batch_size=null"])
    assert config["training"]["learning_rate"] == 1e-3  # YAML 1.1 reads 1e-3 as a string; it is taken as a number
    assert config["training"]["eval_batch_size"] is None

    hint = r"`model` \(AttnStreamConfig\): unknown key\(s\) 'hiden_size' \(did you mean 'hidden_size'\?\)"
    with pytest.raises(ValueError, match=hint):
        load_config(tiny, ["model.hiden_size=64"])
    path = tmp_path / "typo.yaml"
    path.write_text("model_type: palimpsa\nmodel: {num_haeds: 2, head_dim: 16}\n")
    with pytest.raises(
        ValueError, match=r"`model` \(PalimpsaConfig\): unknown key\(s\) 'num_haeds' \(did you mean 'num_heads'"
    ):
        load_config(path)
    with pytest.raises(ValueError, match=r"`training`: unknown key\(s\) 'lr'"):
        load_config(tiny, ["training.lr=0.1"])
    for name in ("tiny-attn_stream", "tiny-palimpsa", "attn_stream-1b", "palimpsa-8m"):  # shipped configs still load
        load_config(CONFIGS / f"{name}.yaml", ["model.dtype=float32"])


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    fsdp = load_config_from_file(str(REPO / "train" / "accelerate" / "fsdp.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp.fsdp_config  # taken from _no_split_modules
    zero3 = load_config_from_file(str(REPO / "train" / "accelerate" / "deepspeed_zero3.yaml"))
    assert zero3.distributed_type == DistributedType.DEEPSPEED
    ds_json = json.loads((REPO / zero3.deepspeed_config["deepspeed_config_file"]).read_text())
    assert ds_json["zero_optimization"]["stage"] == 3
    assert ds_json["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    decoder_layers = amformers.AttnStreamForCausalLM._no_split_modules
    assert decoder_layers == ["AttnStreamDecoderLayer"]


def test_ship_copies_a_finished_run_and_refuses_an_unfinished_one(reference_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from amformers.train import ship

    destination = ship.ship(reference_run, tmp_path / "checkpoints" / "tiny", note="test")
    names = {p.name for p in destination.iterdir()}
    assert "checkpoints" not in names and not any(n.endswith((".bin", ".pkl")) for n in names)  # no training state
    for name in (*ship.MODEL_FILES, *ship.RECORD_FILES, ship.SUMMARY_FILE):
        assert name in names, name
    assert any(n.startswith("modeling_") and n.endswith(".py") for n in names)  # the remote code travels along
    summary = json.loads((destination / ship.SUMMARY_FILE).read_text())
    assert summary["steps"] == REFERENCE_STEPS and summary["tokens"] == REFERENCE_STEPS * 2 * 4 * 32
    assert summary["train_seconds"] > 0 and summary["final_val_loss"] == records(reference_run, "eval")[-1]["val_loss"]
    assert summary["note"] == "test"
    model = AutoModelForCausalLM.from_pretrained(destination)
    assert model.config.model_type == "attn_stream"
    assert ship.ship(reference_run, destination).is_dir()  # shipping again replaces the folder
    assert not list(destination.parent.glob(".*"))  # no staging or backup folder left behind

    partial = tmp_path / "partial"
    shutil.copytree(reference_run, partial, ignore=shutil.ignore_patterns("checkpoints"))
    lines = (partial / "metrics.jsonl").read_text().splitlines()
    (partial / "metrics.jsonl").write_text("\n".join(line for line in lines if '"step": 24,' not in line) + "\n")
    with pytest.raises(ship.ShipError, match="1 missing.*not finished"):
        ship.ship(partial, tmp_path / "unfinished")
    with pytest.raises(ship.ShipError, match="over the 0.001 MB limit"):
        ship.ship(reference_run, tmp_path / "too_big", max_mb=0.001)
    assert not (tmp_path / "unfinished").exists() and not (tmp_path / "too_big").exists()
