"""The text corpus that training and evaluation both read, and where it lives.

The data folder is decided here and nowhere else: a `--data-dir` flag when the command has one, else the
`AMFORMERS_DATA_DIR` environment variable, else `../shared/data` relative to the current directory (this
project's layout: the data folder beside the repository checkout, commands run from the checkout).
"""

import os
from pathlib import Path

DATA_DIR_ENV = "AMFORMERS_DATA_DIR"
DEFAULT_DATA_DIR = Path("..") / "shared" / "data"


def data_dir(path: str | Path | None = None) -> Path:
    """The data folder: `path` (a `--data-dir` flag) if given, else $AMFORMERS_DATA_DIR, else ../shared/data."""
    if path:
        return Path(os.path.expandvars(str(path))).expanduser()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.path.expandvars(os.environ[DATA_DIR_ENV])).expanduser()
    return DEFAULT_DATA_DIR
