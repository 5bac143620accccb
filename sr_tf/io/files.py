"""Atomic writes and checksums: the one way files are published (docs/DESIGN.md,
contract 4: atomic shards and the manifest).

A file is written under a temporary name in its own folder, flushed to disk and renamed
over the target (``os.replace``), so a reader sees the old file or the new one, never a
half-written one; on any error the temporary file is removed and the target is untouched.

A path with a scheme (``gs://``, ``s3://``, ``ram://``: :func:`is_url`) is reached through
``tf.io.gfile`` instead, for the output of a conversion on a cluster; the few file
operations that the shard writer needs (:func:`makedirs`, :func:`listdir`, :func:`size`,
:func:`replace`, :func:`remove`, :func:`read_json`) take either.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid

_TEMPORARY = r"\.[0-9a-f]{8}\.tmp(\.[A-Za-z0-9]+)?"  # the name's own extension may follow


def is_url(path):
    """Whether ``path`` names a file system by its scheme (``gs://bucket/x``), not a local path."""
    return "://" in os.fspath(path)


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def join(folder, name):
    """``folder/name``, for a local folder or a URL."""
    folder = os.fspath(folder)
    return folder.rstrip("/") + "/" + name if is_url(folder) else os.path.join(folder, name)


def makedirs(folder):
    if is_url(folder):
        _gfile().makedirs(os.fspath(folder))
    else:
        os.makedirs(folder, exist_ok=True)


def listdir(folder):
    """Names in ``folder`` (folders of an object store without their trailing slash)."""
    if is_url(folder):
        return [name.rstrip("/") for name in _gfile().listdir(os.fspath(folder))]
    return os.listdir(folder)


def size(path):
    return _gfile().stat(os.fspath(path)).length if is_url(path) else os.path.getsize(path)


def replace(source, target):
    """Rename ``source`` over ``target`` (atomic on a local disk; copy and delete on an object store)."""
    if is_url(target):
        _gfile().rename(os.fspath(source), os.fspath(target), overwrite=True)
    else:
        os.replace(source, target)


def remove(path):
    """Remove a file, or a folder and all it holds; one that is already gone is no error."""
    if is_url(path):
        gfile, path = _gfile(), os.fspath(path)
        if gfile.isdir(path):
            gfile.rmtree(path)
        elif gfile.exists(path):
            gfile.remove(path)
    elif os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def read_json(path):
    """The JSON document in ``path`` (FileNotFoundError when there is none)."""
    if is_url(path):
        gfile = _gfile()
        if not gfile.exists(os.fspath(path)):
            raise FileNotFoundError(path)
        with gfile.GFile(os.fspath(path), "r") as f:
            return json.loads(f.read())
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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
def atomic_open(path, mode="wb", encoding=None, newline=None):
    """Open a temporary file beside ``path`` for writing; on a clean exit it is flushed,
    synced and renamed to ``path``; on an exception it is removed and ``path`` is left as
    it was. The folder is created when missing. ``encoding`` and ``newline``: as ``open``
    takes them, for mode ``"w"``."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes a new file: mode 'wb' or 'w', got {mode!r}")
    target = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    remove_stale_temporaries(target)
    temporary = temporary_name(target)
    try:
        text = {"encoding": encoding, "newline": newline} if mode == "w" else {}
        with open(temporary, mode.replace("w", "x"), **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside ``path`` that ends in ``path``'s own extension, for a writer
    that takes a name and goes by its extension (a Keras ``.keras`` file, a matplotlib
    figure): renamed to ``path`` on a clean exit, removed on an exception."""
    target = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    remove_stale_temporaries(target)
    temporary = temporary_name(target) + os.path.splitext(target)[1]
    try:
        yield temporary
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
    """Write ``payload`` as indented JSON to ``path`` atomically (:func:`atomic_open`; for a
    URL, a temporary object renamed over ``path``)."""
    text = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    if is_url(path):
        folder, name = os.fspath(path).rsplit("/", 1)
        temporary = join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
        gfile = _gfile()
        try:
            with gfile.GFile(temporary, "w") as f:
                f.write(text)
            replace(temporary, path)
        finally:
            remove(temporary)
        return os.fspath(path)
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return os.fspath(path)


def file_sha256(path):
    """Hex SHA-256 of a file (a local path or a URL), read in 1 MB blocks."""
    digest = hashlib.sha256()
    with (_gfile().GFile(os.fspath(path), "rb") if is_url(path) else open(path, "rb")) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
