"""The "amformers_triton" attention implementation: kernels proven in Triton's interpreter, switch behaviour on CPU.

The kernel-vs-reference cases live in tests/triton_interpreter_cases.py and run here in a fresh process with
TRITON_INTERPRET=1 (it must be set before triton is first imported, and transformers imports triton early). The
other tests check what a CPU user sees: the name is registered, the default stays PyTorch, and asking for the
Triton kernels where they cannot run fails with an error that names the alternatives.
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface

import amformers  # noqa: F401  (registers "amformers_triton")
from amformers import AttnStreamConfig, AttnStreamForCausalLM, PalimpsaConfig, PalimpsaForCausalLM

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def run_python(code: str, interpret: bool = False, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_kernels_equal_references_in_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rs",
            str(TESTS / "triton_interpreter_cases.py"),
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and " failed" not in result.stdout, report


def tiny_model(**overrides) -> AttnStreamForCausalLM:
    fields = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return AttnStreamForCausalLM(AttnStreamConfig(**{**fields, **overrides}))


def test_name_is_registered_and_default_stays_pytorch():
    assert "amformers_triton" in AttentionInterface._global_mapping
    assert "amformers_triton" in AttentionMaskInterface._global_mapping
    model = tiny_model()
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("amformers_triton")  # accepted by transformers' validation
    assert model.config._attn_implementation == "amformers_triton"


def test_unknown_implementation_name_raises_naming_alternatives():
    with pytest.raises(ValueError, match="sdpa"):
        tiny_model().set_attn_implementation("amformers_tritn")


def test_triton_on_cpu_without_interpreter_refuses_clearly():
    """Both families refuse (never fall back) when asked for the Triton kernels on CPU tensors."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: the kernels would run in the interpreter.")
    from amformers.modeling.kernels.palimpsa import palimpsa_attention

    model = tiny_model()
    model.set_attn_implementation("amformers_triton")
    with pytest.raises(RuntimeError, match="CUDA GPU") as error:
        model(torch.randint(3, 60, (1, 5)))
    assert "'sdpa'" in str(error.value) and "'eager'" in str(error.value)
    x = torch.randn(1, 4, 1, 8)
    with pytest.raises(RuntimeError, match="CUDA GPU.*impl='chunk'"):
        palimpsa_attention(x, x, x, x.abs(), -torch.rand(1, 4, 1), impl="triton")
    # A Palimpsa model refuses the same way, and the remedy it names for Palimpsa is one Palimpsa accepts.
    palimpsa = PalimpsaForCausalLM(
        PalimpsaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_heads=2, head_dim=8, intermediate_size=0)
    )
    palimpsa.set_attn_implementation("amformers_triton")
    with pytest.raises(RuntimeError, match="CUDA GPU") as error:
        palimpsa(torch.randint(3, 60, (1, 5)))
    remedy = re.search(r"'(\w+)' \(or '(\w+)'\) for Palimpsa", str(error.value))
    assert remedy, str(error.value)
    for name in remedy.groups():
        palimpsa.set_attn_implementation(name)
        palimpsa(torch.randint(3, 60, (1, 5)))


def test_package_works_without_triton_and_the_switch_says_what_to_install():
    result = run_python(
        """
        import sys
        sys.modules["triton"] = None  # as if triton were not installed: importing the package must not need it
        import torch, amformers
        from amformers import AttnStreamConfig, AttnStreamForCausalLM, PalimpsaConfig, PalimpsaForCausalLM
        model = AttnStreamForCausalLM(AttnStreamConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=2, num_attention_heads=2))
        ids = torch.randint(3, 60, (1, 5))
        model(ids)  # the default PyTorch path needs no triton
        model.set_attn_implementation("amformers_triton")
        try:
            model(ids)
        except RuntimeError as error:
            print("ERROR:", error)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not installed" in result.stdout and "amformers[kernels]" in result.stdout and "'sdpa'" in result.stdout


def test_gpu_benchmark_refuses_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run instead of refusing")
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_kernels.py")], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "CUDA GPU" in result.stderr and "Traceback" not in result.stderr
