"""Atomic, sharded TFRecord writing with a manifest (docs/DESIGN.md,
contract 4: atomic shards and the manifest).

Each shard is written under a temporary name and renamed when complete; the manifest
is written last, atomically, and lists only complete shards with their record counts
and SHA-256 checksums. Shard names carry a run id, so a new conversion into the same
folder never touches the shards the current manifest lists: readers see either the
old output or the new one, never a mix. Shards of the previous run are deleted only
after the new manifest is in place.

The output folder may be a URL (``gs://``, ``s3://``: ``sr_tf.io.files.is_url``), written
through ``tf.io.gfile``; an object store has no exclusive create, so such a folder is not
locked. Shards may also be written by other processes (the workers of a Beam pipeline,
``sr_tf.conversion_beam``) with :class:`OpenShard` under this run's id, and listed with
:meth:`ShardWriter.adopt`.
"""

import datetime
import json
import logging
import os
import re
import socket
import uuid

from sr_tf import records
from sr_tf.io.files import (file_sha256, is_url, join, listdir, makedirs, read_json, remove, replace, size,
                            write_json_atomic)

log = logging.getLogger(__name__)

_RUN_ID = r"(?P<run>\d{8}T\d{6}-[0-9a-f]{6})"
# Files this writer creates: finished shards, and shards still being written (by a Beam
# worker's attempt: with 8 hex digits of its own, so that two attempts never share one).
_OWN_FILE = re.compile(
    r"^\.?(train|val|test)-\d{5}-" + _RUN_ID + re.escape(records.SHARD_SUFFIX) + r"(\.[0-9a-f]{8})?(\.incomplete)?$"
)
# A run's scratch folder (ShardWriter.scratch).
_SCRATCH = re.compile(r"^\.scratch-" + _RUN_ID + "$")


LOCK_NAME = ".data_prep.lock"


class OutputLockedError(OSError):
    """Another conversion holds the output folder."""


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def acquire_lock(output_dir):
    """Take ``output_dir``'s lock file (the owner's pid, host and start time), or raise
    OutputLockedError naming the owner. A lock left by a process of this host that no
    longer runs is taken over; one from another host is only reported (it may be live)."""
    path = os.path.join(output_dir, LOCK_NAME)
    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path, encoding="utf-8") as f:
                    held = json.load(f)
            except (OSError, ValueError):
                held = {}
            pid, host = held.get("pid"), held.get("host")
            if host == owner["host"] and isinstance(pid, int) and not _alive(pid):
                try:
                    os.remove(path)  # stale: its process is gone
                except FileNotFoundError:
                    pass
                continue
            raise OutputLockedError(
                f"{output_dir}: another data_prep is writing here (pid {pid} on {host}, since "
                f"{held.get('started', 'an unknown time')}); wait for it, or choose another --output. "
                f"If no such process runs, remove {path}"
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(owner, f)
        return path
    raise OutputLockedError(f"{output_dir}: could not take the lock {path}")


class OpenShard:
    """One shard being written: ``.<name>.incomplete`` (``.<name>.<attempt>.incomplete`` for
    one attempt of several at the same shard) until :meth:`finish` renames it to its name,
    ``records.shard_name(split, index, run_id)``."""

    def __init__(self, output_dir, split, index, run_id, attempt=None):
        import tensorflow as tf

        self.output_dir = os.fspath(output_dir)
        self.split = split
        self.name = records.shard_name(split, index, run_id)
        self.temporary = join(self.output_dir, f".{self.name}" + (f".{attempt}" if attempt else "") + ".incomplete")
        self.records = 0
        self.bytes = 0
        self._writer = tf.io.TFRecordWriter(self.temporary)

    def write(self, serialized):
        self._writer.write(serialized)
        self.records += 1
        self.bytes += len(serialized) + 16  # TFRecord framing: length, two CRCs

    def finish(self):
        """Close and rename the shard; returns its manifest entry (file, split, records,
        bytes, sha256), measured on the bytes this writer wrote."""
        self._writer.close()
        entry = {
            "file": self.name,
            "split": self.split,
            "records": self.records,
            "bytes": size(self.temporary),
            "sha256": file_sha256(self.temporary),
        }
        replace(self.temporary, join(self.output_dir, self.name))
        return entry

    def discard(self):
        self._writer.close()
        remove(self.temporary)


class ShardWriter:
    """Writes serialized records into per-split shards of about ``shard_size_mb``.

    Use as a context manager: it holds the output folder's lock (``acquire_lock``) from
    entry to exit, so a second conversion into the same folder is refused instead of
    deleting this one's shards; on an exception nothing is published, everything of this
    run is removed and the previous output (if any) is left as it was.
    """

    def __init__(self, output_dir, shard_size_mb=100.0, options=None):
        self.output_dir = os.fspath(output_dir)
        self.shard_bytes = max(1, int(shard_size_mb * 1024 * 1024))
        self.options = dict(options or {})
        self.run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S") + (
            "-" + uuid.uuid4().hex[:6]
        )
        self.failed = []
        self.stats = {}
        self.manifest = None
        self._shards = []
        self._open = {}  # split -> OpenShard
        self._next_index = {split: 0 for split in records.SPLITS}
        self._lock = None
        makedirs(self.output_dir)

    def __enter__(self):
        if is_url(self.output_dir):
            log.warning("%s: an object store has no lock; run one conversion at a time into it", self.output_dir)
        else:
            self._lock = acquire_lock(self.output_dir)
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.close()
            else:
                self.abort()
        finally:
            if self._lock is not None:
                os.remove(self._lock)
                self._lock = None
        return False

    @property
    def scratch(self):
        """This run's scratch folder in the output folder (``.scratch-<run_id>``), created on
        first use; removed when the run is published or aborted."""
        folder = join(self.output_dir, f".scratch-{self.run_id}")
        makedirs(folder)
        return folder

    def add(self, split, serialized):
        """Append one serialized record to the current shard of ``split``."""
        if split not in records.SPLITS:
            raise ValueError(f"unknown split {split!r}")
        shard = self._open.get(split)
        if shard is None:
            shard = OpenShard(self.output_dir, split, self._next_index[split], self.run_id)
            self._next_index[split] += 1
            self._open[split] = shard
        shard.write(serialized)
        if shard.bytes >= self.shard_bytes:
            self._shards.append(self._open.pop(split).finish())

    def adopt(self, entry):
        """List a finished shard of this run that another process wrote (``OpenShard.finish``'s
        entry); it must be in the output folder with the size the entry gives."""
        match = _OWN_FILE.match(entry["file"])
        if not match or match.group("run") != self.run_id or entry["file"].startswith("."):
            raise ValueError(f"{entry['file']}: not a shard name of run {self.run_id}")
        if any(shard["file"] == entry["file"] for shard in self._shards):
            raise ValueError(f"{entry['file']}: listed twice")
        found = size(join(self.output_dir, entry["file"]))
        if found != entry["bytes"]:
            raise ValueError(f"{entry['file']}: {found} bytes in {self.output_dir}, its writer reported {entry['bytes']}")
        self._shards.append(dict(entry))

    def fail(self, source, reason):
        """Record an input that could not be converted."""
        self.failed.append({"input": os.fspath(source), "reason": str(reason)})

    @property
    def counts(self):
        counts = {split: 0 for split in records.SPLITS}
        for shard in self._shards:
            counts[shard["split"]] += shard["records"]
        for split, shard in self._open.items():
            counts[split] += shard.records
        return counts

    def close(self):
        """Finish open shards, publish the manifest, then remove the previous run's files."""
        for split in list(self._open):
            self._shards.append(self._open.pop(split).finish())
        previous = self._listed_files()
        manifest = {
            "version": records.MANIFEST_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "run_id": self.run_id,
            "counts": self.counts,
            "shards": sorted(self._shards, key=lambda s: s["file"]),
            "failed": self.failed,
            "stats": self.stats,
            "options": self.options,
        }
        write_json_atomic(join(self.output_dir, records.MANIFEST_NAME), manifest)
        self.manifest = manifest
        current = {shard["file"] for shard in self._shards}
        # The previous run's shards, whatever interrupted runs left behind, this run's scratch.
        leftovers = {name for name in listdir(self.output_dir) if _OWN_FILE.match(name) or _SCRATCH.match(name)}
        for name in (previous | leftovers) - current:
            remove(join(self.output_dir, name))
        return manifest

    def abort(self):
        """Drop everything this run wrote; the published output stays as it was."""
        for split in list(self._open):
            self._open.pop(split).discard()
        self._shards = []
        for name in listdir(self.output_dir):
            match = _OWN_FILE.match(name) or _SCRATCH.match(name)
            if match and match.group("run") == self.run_id:
                remove(join(self.output_dir, name))

    def _listed_files(self):
        """Shard files the currently published manifest lists (empty if none)."""
        try:
            manifest = read_json(join(self.output_dir, records.MANIFEST_NAME))
        except (OSError, ValueError):
            return set()
        if not isinstance(manifest, dict):
            return set()
        return {shard["file"] for shard in manifest.get("shards", []) if isinstance(shard, dict) and "file" in shard}
