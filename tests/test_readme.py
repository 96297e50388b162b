"""The README's fenced Python and shell blocks, run as a reader would run them.

Each block runs in a fresh process, in a scratch folder that links the checkout's `checkpoints/`, `train/` and
`examples/` (so relative paths work and nothing is written into the checkout), with the test's environment first on
PATH (what `source .venv/bin/activate` gives a reader) and the data folder set to the checkout's `../shared/data`.
Commands that would take hours run in the cheapest form that still executes them: a pretraining command on an 8M or
1B config gets `--dry_run` (the config parses, the model is built, the parameter count printed) and runs without its
`accelerate launch` prefix; `make demo` runs the script the Makefile's demo target runs; other `make` targets are
checked to exist (`make -n`), since CI runs them itself. A block can opt out only with a reason, on the line before
its fence: `<!-- doc-test: skip: why -->`.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
LINKED = ("checkpoints", "train", "examples")
SKIP = re.compile(r"<!-- doc-test: skip: (.+?) -->")
FENCE = re.compile(r"^```(\w*)\s*$")


def readme_blocks() -> list[tuple[int, str, str, str | None]]:
    """(line number, language, code, skip reason) of every fenced block in README.md."""
    blocks, lines = [], README.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if match and match.group(1):
            start, body = index, []
            index += 1
            while not lines[index].startswith("```"):
                body.append(lines[index])
                index += 1
            previous = next((line for line in reversed(lines[:start]) if line.strip()), "")
            skip = SKIP.search(previous)
            blocks.append((start + 1, match.group(1), "\n".join(body), skip.group(1) if skip else None))
        index += 1
    return blocks


def shell_commands(code: str) -> list[str]:
    """The commands of a shell block: comments dropped, backslash continuations joined."""
    commands, current = [], ""
    for line in code.splitlines():
        line = re.sub(r"\s+#.*$", "", line) if not line.lstrip().startswith("#") else ""
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            commands.extend(part.strip() for part in current.split("&&"))
        current = ""
    return commands


def runnable(command: str) -> str:
    """The form of `command` this test runs (see the module docstring)."""
    words = shlex.split(command)
    if words[:2] == ["make", "demo"]:
        recipe = re.search(r"^demo:.*\n\t(.+)$", (REPO / "Makefile").read_text(), flags=re.MULTILINE).group(1)
        assert recipe == "$(VENV)/bin/python examples/quickstart.py", recipe
        return "python examples/quickstart.py"
    if words[0] == "make":
        return f"make -n -C {shlex.quote(str(REPO))} {shlex.join(words[1:])}"
    if words[:2] == ["accelerate", "launch"]:
        words = ["python", *words[words.index("-m") :]]
    if words[:3] == ["python", "-m", "amformers.train.pretrain"] and "tiny-" not in command:
        words.append("--dry_run")
    return shlex.join(words) if words != shlex.split(command) else command


def run(command: list[str] | str, workdir: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "AMFORMERS_DATA_DIR": str(REPO.parent / "shared" / "data"),
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(
        command, shell=isinstance(command, str), cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reader")
    for name in LINKED:
        (folder / name).symlink_to(REPO / name)
    return folder


BLOCKS = readme_blocks()


def test_the_readme_has_runnable_blocks_and_every_skip_says_why():
    assert sum(1 for _, language, _, skip in BLOCKS if language in ("python", "bash") and skip is None) >= 8
    for line, language, _, skip in BLOCKS:
        assert language in ("python", "bash", "yaml"), f"README line {line}: unknown block language {language!r}"
        assert skip is None or len(skip.split()) >= 3, f"README line {line}: a skipped block needs a real reason"


@pytest.mark.parametrize(
    "line, language, code",
    [pytest.param(line, lang, code, id=f"line{line}-{lang}") for line, lang, code, skip in BLOCKS if skip is None],
)
def test_readme_block_runs(line, language, code, workdir):
    if language == "python":
        result = run([sys.executable, "-c", code], workdir)
        assert result.returncode == 0, f"README line {line}:\n{result.stderr[-3000:]}"
        return
    if language != "bash":
        pytest.skip(f"{language} blocks are examples of file contents, not commands")
    for command in shell_commands(code):
        result = run(runnable(command), workdir)
        assert result.returncode == 0, (
            f"README line {line}: {command}\n{result.stdout[-1500:]}\n{result.stderr[-3000:]}"
        )
