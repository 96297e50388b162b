"""Every command line a new user meets answers `--help` with a one-line description and a copy-pasteable example."""

import io
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITES = ["ioi", "blimp", "babi", "perplexity", "lm-eval", "precision", "generate", "all", "tasks-path"]
COMMANDS = {
    "amformers.train.pretrain": [],
    "amformers.train.ship": [],
    "amformers.train.tokenizer": [],
    "amformers.model_card": [],
    "amformers.eval": [],
    **{f"amformers.eval {suite}": [suite] for suite in SUITES},
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_has_a_description_and_an_example(name):
    module = name.split()[0]
    done = subprocess.run(
        [sys.executable, "-m", module, *COMMANDS[name], "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout
    usage, description = text.split("\n\n")[:2]
    assert usage.startswith("usage: python -m ") and description.strip() and "\n" not in description.strip()
    assert "example:\n" in text or "examples:\n" in text, text
    examples = text.split("example", 1)[1].splitlines()[1:]
    commands = [line.strip() for line in examples if line.startswith("  ")]
    assert commands, text
    # The examples run the command the help is about (lm-eval's example wraps `tasks-path`).
    assert any(f"-m {name}" in command or f"$(python -m {name})" in command for command in commands), commands


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_eval_progress_bar_shows_an_eta_on_a_terminal_only(monkeypatch):
    from amformers.eval.common import QUIET_ENV, progress

    monkeypatch.delenv(QUIET_ENV, raising=False)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert list(progress(range(4), desc="blimp", unit="batch")) == [0, 1, 2, 3]
    assert "blimp: 100%" in terminal.getvalue() and "4/4 [" in terminal.getvalue() and "<" in terminal.getvalue()
    before = terminal.getvalue()
    list(progress(range(4)))  # no name: an inner loop, silent
    monkeypatch.setenv(QUIET_ENV, "1")  # --quiet
    list(progress(range(4), desc="blimp"))
    assert terminal.getvalue() == before
    piped = io.StringIO()  # not a terminal: nothing
    monkeypatch.setattr(sys, "stderr", piped)
    monkeypatch.delenv(QUIET_ENV)
    list(progress(range(4), desc="blimp"))
    assert piped.getvalue() == ""
