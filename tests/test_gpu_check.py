"""bench/gpu_check.sh and the Python entry points it runs, checked on CPU: the script's syntax, its no-CUDA exit,
its orchestration (with a stand-in interpreter), the MQAR scripts at tiny settings, and the kernel cases' refusal
to run where they cannot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def bash(*args, env=None, timeout=60):
    return subprocess.run(["bash", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_gpu_check_parses_and_exits_0_without_cuda():
    assert bash("-n", str(SCRIPT)).returncode == 0
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    result = bash(str(SCRIPT), env=env)
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU" in result.stdout and "===" not in result.stdout  # nothing ran


def test_gpu_check_runs_every_part_reports_failures_and_writes_a_summary(tmp_path):
    """A stand-in `python` that claims a GPU and fails only the kernel timings: every part still runs, the failure
    is reported, the exit status is 1 and the summary JSON is valid. Runs in a copy so bench/results stays clean."""
    copy = tmp_path / "repo"
    (copy / "bench").mkdir(parents=True)
    (copy / "bench" / "gpu_check.sh").write_text(SCRIPT.read_text())
    fake = tmp_path / "fake-python"
    fake.write_text(
        '#!/usr/bin/env bash\necho "$@" >> "$(dirname "$0")/calls"\n'
        'case "$*" in *gpu_kernels.py*) exit 3;; *get_device_name*) echo FakeGPU;; esac\nexit 0\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "MQAR_SECONDS": "7"}
    result = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=copy, env=env, capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "kernel_timings: FAILED (exit 3)" in result.stdout
    summary = json.loads((copy / "bench" / "results" / "gpu_check.json").read_text())
    assert summary["device"] == "FakeGPU" and summary["mqar_seconds"] == 7
    assert [(p["part"], p["exit"]) for p in summary["parts"]] == [
        ("kernels_vs_references", 0), ("kernel_timings", 3), ("mqar_step_time", 0), ("mqar_official_512x128", 0),
    ]  # fmt: skip
    calls = (tmp_path / "calls").read_text()
    assert "tests/triton_interpreter_cases.py" in calls and "--max-seconds 7" in calls
    assert "--families palimpsa not_palimpsa mamba2" in calls


def test_mqar_official_tiny_runs_on_cpu(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import mqar_official

    out = tmp_path / "official.json"
    result = mqar_official.main(["--device", "cpu", "--tiny", "--max-seconds", "5", "--epochs", "1", "--out", str(out)])
    assert json.loads(out.read_text())["command"].startswith("python bench/mqar_official.py --device cpu --tiny")
    assert set(result["runs"]) == {"palimpsa", "not_palimpsa", "mamba2"}
    for run in result["runs"].values():
        assert run["steps"] == 4 and 0.0 <= run["best_test_accuracy"] <= 1.0  # 64 examples / batch 16, one epoch
        assert run["config"]["vocab_size"] == 64 and run["stopped"] in ("epochs", "target")
    official = mqar_official.OFFICIAL  # what the GPU run trains, as issue 18 states the official configuration
    assert [official[k] for k in ("d_model", "seq_len", "kv_pairs", "vocab_size")] == [128, 512, 128, 8192]


def test_mqar_official_stops_at_its_time_budget(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import mqar_official

    result = mqar_official.main(
        ["--device", "cpu", "--tiny", "--max-seconds", "0", "--families", "mamba2", "--out", str(tmp_path / "o.json")]
    )
    (run,) = result["runs"].values()
    assert run["stopped"] == "time budget" and run["steps"] == 1 and len(run["history"]) == 1


def test_mqar_official_refuses_cuda_without_a_gpu(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "bench/mqar_official.py", "--device", "cuda", "--out", str(tmp_path / "x.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "no CUDA device" in result.stdout
    assert not (tmp_path / "x.json").exists()


def test_mqar_step_time_tiny_measures_every_family_against_attention(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import mqar_step_time

    out = tmp_path / "steps.json"
    args = ["--d-model", "32", "--seq-len", "32", "--kv-pairs", "4", "--batch-size", "2", "--vocab-size", "64",
            "--warmup", "1", "--steps", "2", "--claim-steps", "100", "--out", str(out)]  # fmt: skip
    result = mqar_step_time.main(args)
    rows = result["families"]
    assert set(rows) == set(mqar_step_time.FAMILIES) and rows["attention"]["ratio_to_attention"] == 1.0
    for row in rows.values():
        assert len(row["step_seconds"]) == 2 and row["min_step_seconds"] <= row["median_step_seconds"]
    claim = result["claim_grid"]
    expected = sum(4 * 3 * 100 * rows[f]["median_step_seconds"] / 3600 for f in mqar_step_time.RECURRENT)
    assert claim["total_hours"] == pytest.approx(expected) and set(claim["per_family"]) == set(mqar_step_time.RECURRENT)
    assert json.loads(out.read_text())["command"] == "python bench/mqar_step_time.py " + " ".join(args)


def test_kernel_cases_refuse_without_interpreter_or_cuda():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, 'tests'); import triton_interpreter_cases"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0 and "TRITON_INTERPRET=1" in result.stderr and "CUDA GPU" in result.stderr
