"""The files a run writes, each whole or not at all: ``atomic_path(path)`` gives a temporary
file beside ``path`` that replaces it (``os.replace``) once written, and is removed when
writing fails (a full disk, an interrupt), so the previous file stays as it was and nothing
partial is left; ``write_json(path, record)`` writes a results file so. ``check_writable(folder)``
creates a folder and writes and removes a probe file in it: a run checks its output folder
before it reads any data.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path in ``path``'s folder to write to; on leaving the block it replaces
    ``path``, or is removed if the block raised (``path`` is then untouched)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        yield partial
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, record) -> None:
    """``record`` as indented JSON at ``path``, atomically."""
    text = json.dumps(record, indent=2)
    with atomic_path(path) as partial:
        partial.write_text(text)


def check_writable(folder: str | Path) -> None:
    """Create ``folder`` (and its parents) and write and remove a probe file in it; the
    OSError of the first step that fails (a file in the way, no permission, a full disk)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    descriptor, probe = tempfile.mkstemp(prefix=".write-probe-", suffix=PARTIAL_SUFFIX, dir=folder)
    try:
        os.write(descriptor, b"probe")
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
        os.unlink(probe)
