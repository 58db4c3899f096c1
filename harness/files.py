"""Writes a crash cannot tear, and the JSON files geobench reads back: a file is written under a
temporary name, synced and renamed into place; a failed write or an unreadable file is one
`UsageError` naming the file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from geobench.api import UsageError

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "read_json", "writing"]


@contextlib.contextmanager
def writing(path: str | Path, *partial: Path) -> Iterator[None]:
    """Turn a failed write of `path` (disk full, read-only, a file in the way) into a UsageError
    naming the file and the cause, after removing the `partial` files the write left behind."""
    try:
        yield
    except (OSError, UsageError) as exc:
        for leftover in partial:
            with contextlib.suppress(OSError):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        if isinstance(exc, UsageError):  # an inner write already named its file
            raise
        raise UsageError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with writing(path, tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | Path, what: str) -> Any:
    """A JSON file geobench reads back (a report, an index, a state's counters); an unreadable,
    truncated or malformed one is a UsageError naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what} {str(path)!r} is not valid JSON ({exc}); was it truncated?") from None
