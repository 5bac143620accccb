"""Atomic writes and checksums: the one way files are published (docs/DESIGN.md,
contract 4: atomic shards and the manifest).

A file is written under a temporary name in its own folder, flushed to disk and renamed
over the target (``os.replace``), so a reader sees the old file or the new one, never a
half-written one; on any error the temporary file is removed and the target is untouched.
"""

import contextlib
import hashlib
import json
import os
import re
import time
import uuid

_TEMPORARY = r"\.[0-9a-f]{8}\.tmp"


def temporary_name(path):
    """``<folder>/.<name>.<8 hex>.tmp``: where :func:`atomic_open` writes ``path`` first."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")


def remove_stale_temporaries(path, older_than=60.0):
    """Remove what interrupted (killed) writes of ``path`` left behind: the temporary names
    only :func:`atomic_open` makes, older than ``older_than`` seconds (so a write of the
    same name running now in another process is left alone)."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    pattern = re.compile(r"^\." + re.escape(name) + _TEMPORARY + "$")
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        candidate = os.path.join(folder, entry)
        try:
            if pattern.match(entry) and time.time() - os.path.getmtime(candidate) > older_than:
                os.remove(candidate)
        except OSError:
            pass


@contextlib.contextmanager
def atomic_open(path, mode="wb", encoding=None):
    """Open a temporary file beside ``path`` for writing; on a clean exit it is flushed,
    synced and renamed to ``path``; on an exception it is removed and ``path`` is left as
    it was. The folder is created when missing."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes a new file: mode 'wb' or 'w', got {mode!r}")
    target = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    remove_stale_temporaries(target)
    temporary = temporary_name(target)
    try:
        with open(temporary, mode.replace("w", "x"), encoding=encoding if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_bytes_atomic(path, data):
    """Write ``data`` to ``path`` atomically (:func:`atomic_open`)."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return os.fspath(path)


def write_json_atomic(path, payload):
    """Write ``payload`` as indented JSON to ``path`` atomically (:func:`atomic_open`)."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")
    return os.fspath(path)


def file_sha256(path):
    """Hex SHA-256 of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
