"""Conversion of source files into sharded TFRecords: discovery, splits, workers, writing.

Work is split into tasks, one per source unit (a file, a multi-frame file, a NIfTI
volume, or a DICOM series found in a folder). Worker processes read and encode slices
(no TensorFlow in the workers); the parent serializes them and writes shards. A task
that fails is reported in the manifest and the others go on. ``sr_tf.conversion_beam``
runs the same tasks as an Apache Beam pipeline (``Options.runner``), from the same
planning (``prepare``) to the same manifest (``Tally``).
"""

import collections
import dataclasses
import glob
import hashlib
import json
import logging
import multiprocessing
import os

import numpy as np

from sr_tf.io import readers
from sr_tf.io.shards import ShardWriter
from sr_tf import intensity, records

log = logging.getLogger(__name__)

RUNNERS = ("local", "beam")


@dataclasses.dataclass
class Options:
    """Conversion options; everything is recorded in the manifest."""

    val_fraction: float = 0.1
    test_fraction: float = 0.1
    intensity_range: tuple = None  # overrides the modality defaults
    slice_axis: str = "axial"
    volume_index: object = 0  # int or "all"
    modality: str = None  # for NIfTI and raster inputs
    raster_modality: str = "DX"
    patient_id_regex: str = None
    split_map: dict = None  # patient_id -> split, overrides the hash
    shard_size_mb: float = 100.0
    workers: int = 1
    runner: str = "local"  # local: worker processes here; beam: an Apache Beam pipeline (sr_tf.conversion_beam)
    strict: bool = False
    keep_empty: bool = False
    max_pixels: int = readers.DEFAULT_MAX_PIXELS  # per image (slice, frame); 0: no limit

    def check(self):
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"--{name} must be in [0, 1), got {value}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("--val_fraction + --test_fraction must leave some data for training")
        if self.slice_axis not in readers.SLICE_AXES:
            raise ValueError(f"--slice_axis must be one of {sorted(readers.SLICE_AXES)}")
        if self.intensity_range is not None:
            lo, hi = self.intensity_range
            if not hi > lo:
                raise ValueError(f"--intensity_range needs max > min, got {lo},{hi}")
        if self.max_pixels < 0:
            raise ValueError(f"--max_pixels must be 0 (no limit) or positive, got {self.max_pixels}")
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if self.runner not in RUNNERS:
            raise ValueError(f"--runner must be one of {', '.join(RUNNERS)}, got {self.runner!r}")
        for pid, split in (self.split_map or {}).items():
            if split not in records.SPLITS:
                raise ValueError(f"split map gives {pid!r} the unknown split {split!r}")


def split_for(patient_id, val_fraction, test_fraction, split_map=None):
    """Stable split of a patient: a SHA-256 of the id placed in [0, 1)."""
    if split_map and patient_id in split_map:
        return split_map[patient_id]
    # surrogateescape: an id taken from a file name that is not UTF-8 hashes by its bytes.
    digest = hashlib.sha256(patient_id.encode("utf-8", "surrogateescape")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    if position < test_fraction:
        return "test"
    if position < test_fraction + val_fraction:
        return "val"
    return "train"


def load_split_file(path):
    """A split map from JSON ({patient_id: split}) or CSV lines ``patient_id,split``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.lower().endswith(".json"):
        return {str(k): str(v) for k, v in json.loads(text).items()}
    mapping = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            pid, _, split = line.rpartition(",")
            if pid and split.strip() in records.SPLITS:
                mapping[pid.strip()] = split.strip()
    return mapping


# ----------------------------------------------------------------------------- discovery


@dataclasses.dataclass
class Task:
    kind: str  # dicom, dicom_series, nifti, raster
    paths: list

    @property
    def label(self):
        return self.paths[0] if len(self.paths) == 1 else os.path.dirname(self.paths[0])


def expand_inputs(inputs):
    """Files from paths, folders (recursive) and glob patterns; returns (files, missing)."""
    files, missing = [], []
    for item in inputs:
        item = os.path.expanduser(item)
        if os.path.isdir(item):
            for root, dirs, names in os.walk(item):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
        elif os.path.isfile(item):
            files.append(item)
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                missing.append((item, "glob pattern matched no file"))
            for match in matches:
                files.extend(expand_inputs([match])[0])
        else:
            missing.append((item, "no such file or folder"))
    seen, unique = set(), []
    for path in files:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique, missing


def plan_tasks(files, explicit=()):
    """Group files into tasks; returns (tasks, failures, skipped).

    Single-frame DICOM files that share a SeriesInstanceUID become one series task,
    sorted by ImagePositionPatient. Files of unknown format are failures when named
    explicitly and skipped (with a note) when found while walking a folder.
    """
    explicit = {os.path.abspath(p) for p in explicit}
    tasks, failures, skipped = [], [], []
    series = collections.defaultdict(list)
    for path in files:
        problem = readers.not_a_regular_file(path)
        if problem is not None:
            broken, reason = problem
            (failures if broken or os.path.abspath(path) in explicit else skipped).append((path, reason))
            continue
        kind = readers.detect_format(path)
        if os.path.getsize(path) == 0:  # whatever its name says it is
            (failures if kind or os.path.abspath(path) in explicit else skipped).append((path, "empty file (0 bytes)"))
        elif kind is None:
            reason = "unknown format (not DICOM, NIfTI, PNG, JPEG or TIFF)"
            (failures if os.path.abspath(path) in explicit else skipped).append((path, reason))
        elif kind == "dicom":
            try:
                header = readers.read_dicom_header(path)
            except readers.InputError as exc:
                failures.append((path, str(exc)))
                continue
            uid = str(header.get("SeriesInstanceUID", "") or "")
            if int(header.get("NumberOfFrames", 1) or 1) > 1 or not uid:
                tasks.append(Task("dicom", [path]))
            else:
                series[uid].append((readers.series_sort_key(header, path), path))
        else:
            tasks.append(Task(kind, [path]))
    for members in series.values():
        ordered = [p for _, p in sorted(members)]
        tasks.append(Task("dicom" if len(ordered) == 1 else "dicom_series", ordered))
    tasks.sort(key=lambda t: t.paths[0])
    return tasks, failures, skipped


# ----------------------------------------------------------------------------- workers


def _read_task(task, options):
    """Volumes and per-file failures of one task (runs in a worker)."""
    failures = []
    if task.kind == "dicom_series":
        volume, failures = readers.read_dicom_series(task.paths, options.max_pixels)
        volumes = [volume] if volume is not None else []
    elif task.kind == "dicom":
        volumes = [readers.read_dicom(task.paths[0], options.max_pixels)]
    elif task.kind == "nifti":
        pid = readers.patient_from_path(task.paths[0], options.patient_id_regex)
        volumes = readers.read_nifti(
            task.paths[0], options.slice_axis, options.volume_index, options.modality, pid, options.max_pixels
        )
    else:
        pid = readers.patient_from_path(task.paths[0], options.patient_id_regex)
        volumes = [readers.read_raster(task.paths[0], options.modality or options.raster_modality, pid,
                                       options.max_pixels)]
    return volumes, failures


def convert_task(task, options):
    """Read, map and encode the slices of one task.

    Returns ``dict(records=[(SliceRecord without image, png bytes)], failures=[...],
    clipped=int, empty=int)``. Never raises for a bad input: it becomes a failure.
    """
    result = {"records": [], "failures": [], "clipped": 0, "empty": 0, "label": task.label}
    try:
        volumes, result["failures"] = _read_task(task, options)
    except readers.InputError as exc:
        result["failures"] = [(task.label, str(exc))]
        return result
    except Exception as exc:  # a reader bug must not stop the other files
        result["failures"] = [(task.label, f"unexpected error ({type(exc).__name__}: {exc})")]
        return result
    for volume in volumes:
        lo, hi = options.intensity_range or volume.intensity_range
        split = split_for(volume.patient_id, options.val_fraction, options.test_fraction, options.split_map)
        for image, index, source in zip(volume.slices, volume.slice_indices, volume.slice_sources):
            if not options.keep_empty and float(np.ptp(image)) == 0.0:
                result["empty"] += 1
                continue
            stored, clipped = intensity.to_stored(image, lo, hi)
            result["clipped"] += clipped
            record = records.SliceRecord(
                image=None,
                modality=volume.modality,
                source=source,
                patient_id=volume.patient_id,
                slice_index=int(index),
                pixel_spacing=volume.pixel_spacing,
                intensity_min=float(lo),
                intensity_max=float(hi),
                split=split,
            )
            result["records"].append((record, records.encode_png16(stored)))
    return result


def _worker_init():
    # Workers only read files; keep numeric libraries to one thread each.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _run(args):
    return convert_task(*args)


def iter_results(tasks, options):
    """Results of ``convert_task`` in task order, in ``options.workers`` processes."""
    if options.workers == 1 or len(tasks) <= 1:
        for task in tasks:
            yield convert_task(task, options)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(options.workers, len(tasks)), initializer=_worker_init) as pool:
        yield from pool.imap(_run, [(task, options) for task in tasks], chunksize=1)


# ----------------------------------------------------------------------------- driver


class ConversionError(RuntimeError):
    """Raised with ``--strict`` at the first failure, or when no image was written."""


@dataclasses.dataclass
class Prepared:
    """What the driver knows before any image is read, whichever runner converts."""

    tasks: list
    failures: list  # (input, reason): missing inputs, then files that failed while planning
    skipped: list  # (input, reason): files found in a folder that are not images
    manifest_options: dict


def prepare(inputs, output_dir, options):
    """Check the options, find the files and plan the tasks of a conversion.

    Raises :class:`ConversionError` when the output folder is an input, and with
    ``options.strict`` when an input already failed.
    """
    options.check()
    files, missing = expand_inputs(inputs)
    inputs_abs = {os.path.abspath(p) for p in inputs}
    if os.path.abspath(output_dir) in inputs_abs:
        raise ConversionError(f"{output_dir}: output folder is also an input; choose another output")
    tasks, failures, skipped = plan_tasks(files, explicit=[p for p in inputs if os.path.isfile(p)])
    failures = list(missing) + failures
    if options.strict and failures:
        path, reason = failures[0]
        raise ConversionError(f"{path}: {reason}")
    manifest_options = {k: v for k, v in dataclasses.asdict(options).items() if k != "split_map"}
    manifest_options["split_map_size"] = len(options.split_map or {})
    manifest_options["inputs"] = [os.fspath(p) for p in inputs]
    return Prepared(tasks, failures, skipped, manifest_options)


def summarize_task(result):
    """What the manifest needs of one ``convert_task`` result, without its images:
    JSON-ready, so that a Beam worker can return it."""
    patients = collections.defaultdict(set)
    modalities = collections.Counter()
    for record, _ in result["records"]:
        patients[record.split].add(record.patient_id)
        modalities[record.modality] += 1
    return {
        "label": result["label"],
        "failures": [list(failure) for failure in result["failures"]],
        "clipped": result["clipped"],
        "empty": result["empty"],
        "patients": {split: sorted(ids) for split, ids in patients.items()},
        "modalities": dict(modalities),
    }


class Tally:
    """Failures and statistics of a conversion, added up from task summaries
    (``summarize_task``) in task order; the same for every runner."""

    def __init__(self, prepared, strict=False):
        self.prepared = prepared
        self.strict = strict
        self.failures = list(prepared.failures)
        self._patients = {split: set() for split in records.SPLITS}
        self._modalities = collections.Counter()
        self._clipped = {}
        self._empty = 0

    def add(self, summary):
        """Add one task's summary; with ``strict``, its first failure raises ConversionError."""
        failures = [tuple(failure) for failure in summary["failures"]]
        self.failures.extend(failures)
        if self.strict and failures:
            path, reason = failures[0]
            raise ConversionError(f"{path}: {reason}")
        for split, ids in summary["patients"].items():
            self._patients[split].update(ids)
        self._modalities.update(summary["modalities"])
        self._empty += summary["empty"]
        if summary["clipped"]:
            self._clipped[summary["label"]] = summary["clipped"]

    def finish(self, writer):
        """Give ``writer`` the failures and statistics of the manifest; raises
        ConversionError when no image at all was written."""
        for path, reason in self.failures:
            writer.fail(path, reason)
        writer.stats = {
            "tasks": len(self.prepared.tasks),
            "patients": {split: len(ids) for split, ids in self._patients.items()},
            "modalities": dict(self._modalities),
            "clipped_pixels": sum(self._clipped.values()),
            "clipped_pixels_by_source": self._clipped,
            "skipped_empty_slices": self._empty,
            "skipped_files": [{"input": p, "reason": r} for p, r in self.prepared.skipped],
        }
        if sum(writer.counts.values()) == 0:
            raise ConversionError(_no_output_message(writer.output_dir, self.failures, self.prepared.skipped))


def convert(inputs, output_dir, options, progress=True, beam_options=None):
    """Convert ``inputs`` into ``output_dir``; returns the manifest written.

    With ``options.runner == "beam"`` an Apache Beam pipeline converts them
    (``sr_tf.conversion_beam.convert``, run with ``beam_options``); otherwise
    ``options.workers`` processes of this machine.

    Raises :class:`ConversionError` when ``options.strict`` and an input fails (nothing
    is published then), and when no image at all could be written.
    """
    if options.runner == "beam":
        from sr_tf import conversion_beam

        return conversion_beam.convert(inputs, output_dir, options, beam_options)
    from tqdm import tqdm

    output_dir = os.fspath(output_dir)
    prepared = prepare(inputs, output_dir, options)
    tally = Tally(prepared, options.strict)
    writer = ShardWriter(output_dir, options.shard_size_mb, prepared.manifest_options)
    with writer:
        bar = tqdm(total=len(prepared.tasks), desc="data_prep", unit="file", disable=not progress, leave=False)
        for result in iter_results(prepared.tasks, options):
            bar.update(1)
            tally.add(summarize_task(result))
            for record, png in result["records"]:
                writer.add(record.split, records.serialize(record, png=png))
            bar.set_postfix(records=sum(writer.counts.values()), failed=len(tally.failures))
        bar.close()
        tally.finish(writer)
    return writer.manifest


def _no_output_message(output_dir, failures, skipped):
    lines = [f"{output_dir}: no image could be converted"]
    lines += [f"  {path}: {reason}" for path, reason in (failures + skipped)[:20]]
    return "\n".join(lines)
