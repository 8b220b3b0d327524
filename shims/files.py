"""Writing a whole output folder atomically (merged exports, converted adapters).

A folder is built in a temporary sibling and renamed into place only once complete, so a reader never sees a
half-written checkpoint and a failure (or an interrupt) leaves the previous content as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def refuse_existing(dst: Path, overwrite: bool) -> None:
    """Raise FileExistsError when ``dst`` exists and may not be replaced (checked before any work is done)."""
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True to replace it")


@contextmanager
def staged_dir(dst, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``dst``; when the block finishes it replaces ``dst``.

    If the block raises (anything, KeyboardInterrupt included) the temporary folder is removed and ``dst`` is
    left untouched.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp.", dir=dst.parent))
    try:
        yield tmp
        replace_dir(tmp, dst, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Move a finished temp folder to ``dst``; an existing ``dst`` is swapped out only after that succeeds."""
    if not dst.exists():
        os.replace(tmp, dst)
        return
    refuse_existing(dst, overwrite)
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=dst.parent))
    os.rmdir(old)
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except OSError:
        os.replace(old, dst)  # put the previous content back
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_json(path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_json(path, data) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
