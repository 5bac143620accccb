"""Atomic, sharded TFRecord writing with a manifest (docs/DESIGN.md,
contract 4: atomic shards and the manifest).

Each shard is written under a temporary name and renamed when complete; the manifest
is written last, atomically, and lists only complete shards with their record counts
and SHA-256 checksums. Shard names carry a run id, so a new conversion into the same
folder never touches the shards the current manifest lists: readers see either the
old output or the new one, never a mix. Shards of the previous run are deleted only
after the new manifest is in place.
"""

import datetime
import json
import os
import re
import socket
import uuid

from sr_tf import records
from sr_tf.io.files import file_sha256, write_json_atomic

# Files this writer creates: finished shards and shards still being written.
_OWN_FILE = re.compile(
    r"^\.?(train|val|test)-\d{5}-\d{8}T\d{6}-[0-9a-f]{6}" + re.escape(records.SHARD_SUFFIX) + r"(\.incomplete)?$"
)


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


class ShardWriter:
    """Writes serialized records into per-split shards of about ``shard_size_mb``.

    Use as a context manager: it holds the output folder's lock (``acquire_lock``) from
    entry to exit, so a second conversion into the same folder is refused instead of
    deleting this one's shards; on an exception nothing is published and the previous
    output (if any) is left as it was.
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
        self._open = {}  # split -> [writer, tmp_path, final_name, n_records, n_bytes]
        self._next_index = {split: 0 for split in records.SPLITS}
        self._lock = None
        os.makedirs(self.output_dir, exist_ok=True)

    def __enter__(self):
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

    def add(self, split, serialized):
        """Append one serialized record to the current shard of ``split``."""
        import tensorflow as tf

        if split not in records.SPLITS:
            raise ValueError(f"unknown split {split!r}")
        state = self._open.get(split)
        if state is None:
            name = records.shard_name(split, self._next_index[split], self.run_id)
            self._next_index[split] += 1
            tmp = os.path.join(self.output_dir, f".{name}.incomplete")
            state = [tf.io.TFRecordWriter(tmp), tmp, name, 0, 0]
            self._open[split] = state
        state[0].write(serialized)
        state[3] += 1
        state[4] += len(serialized) + 16  # TFRecord framing: length, two CRCs
        if state[4] >= self.shard_bytes:
            self._finish(split)

    def fail(self, source, reason):
        """Record an input that could not be converted."""
        self.failed.append({"input": os.fspath(source), "reason": str(reason)})

    def _finish(self, split):
        writer, tmp, name, n_records, _ = self._open.pop(split)
        writer.close()
        final = os.path.join(self.output_dir, name)
        os.replace(tmp, final)
        self._shards.append(
            {
                "file": name,
                "split": split,
                "records": n_records,
                "bytes": os.path.getsize(final),
                "sha256": file_sha256(final),
            }
        )

    @property
    def counts(self):
        counts = {split: 0 for split in records.SPLITS}
        for shard in self._shards:
            counts[shard["split"]] += shard["records"]
        for split, state in self._open.items():
            counts[split] += state[3]
        return counts

    def close(self):
        """Finish open shards, publish the manifest, then remove the previous run's files."""
        for split in list(self._open):
            self._finish(split)
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
        write_json_atomic(os.path.join(self.output_dir, records.MANIFEST_NAME), manifest)
        self.manifest = manifest
        current = {shard["file"] for shard in self._shards}
        # The previous run's shards, and whatever an interrupted run left behind.
        leftovers = {name for name in os.listdir(self.output_dir) if _OWN_FILE.match(name)}
        for name in (previous | leftovers) - current:
            try:
                os.remove(os.path.join(self.output_dir, name))
            except FileNotFoundError:
                pass
        return manifest

    def abort(self):
        """Drop everything this run wrote; the published output stays as it was."""
        for split in list(self._open):
            writer, tmp, *_ = self._open.pop(split)
            writer.close()
            os.remove(tmp)
        for shard in self._shards:
            os.remove(os.path.join(self.output_dir, shard["file"]))
        self._shards = []

    def _listed_files(self):
        """Shard files the currently published manifest lists (empty if none)."""
        try:
            manifest = records.read_manifest(self.output_dir)
        except records.RecordsError:
            return set()
        return {shard["file"] for shard in manifest.get("shards", [])}
