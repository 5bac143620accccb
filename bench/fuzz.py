"""Fuzz the readers: mutated bytes of real sample files into every reader.

    pip install atheris        # bench only: neither the library nor the tests need it
    python -m bench.fuzz [--executions=10000] [--targets=read_dicom,load] [--timeout_s=10] [--memory_mb=4096]

Each target of ``TARGETS`` (a reader of ``sr_tf.io.readers``, or ``sr_tf.upscaling.load``)
is fuzzed by atheris (libFuzzer, coverage-guided over sr_tf, pydicom, nibabel and
Pillow) in a process of its own, for ``--executions`` inputs, two targets at a time
(``--jobs``). The seeds are real files: DICOMs of pydicom and pydicom-data (CT, MR, an
enhanced multi-frame MR plain and JPEG 2000 compressed, a radiograph cut to 64 x 64,
JPEG, JPEG 2000, JPEG-LS and RLE compressed images, RGB, big endian, an RT plan without
pixels), nibabel's test NIfTIs (NIfTI-1 and NIfTI-2, 3-D and 4-D, plain and gzipped),
and PNG, JPEG and TIFF images made from them. Each input is written to a temporary file
(the readers take paths) whose extension follows its content.

A target may return or raise its named error (``readers.InputError``,
``upscaling.UpscaleError``; ``detect_format`` may raise nothing). Anything else is a
failure:

- any other exception, or a named error raised from a MemoryError (an allocation the
  input asked for);
- a crash (a signal), a hang over ``--timeout_s``, or memory over ``--memory_mb``: the
  worker's address space is capped with RLIMIT_AS, libFuzzer saves the input and exits,
  and the worker is started again for the executions left.

The first input of each distinct failure (its type and where it was raised) is saved as
tests/data/fuzz/<target>/<hash>.<ext>, which tests/sr_tf/io/test_untrusted_inputs.py runs. At the
end every saved input is replayed in a fresh process, under the same limits, to count
those that now give the named error or read; the table goes to docs/BENCHMARKS.md.
"""

import concurrent.futures
import glob
import hashlib
import importlib.util
import json
import mmap
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

from absl import app, flags

from bench.fuzz_targets import TARGETS, targets
from bench.report import machine, update_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ_DATA = os.path.join(ROOT, "tests", "data", "fuzz")
INSTRUMENTED = ("sr_tf", "pydicom", "nibabel", "PIL")
STARTUP_S = 60  # a replay's interpreter start-up and imports, on top of --timeout_s
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")  # one core per process

FLAGS = flags.FLAGS
flags.DEFINE_integer("executions", 10000, "Inputs per target.")
flags.DEFINE_list("targets", None, "Targets to fuzz (default: all of TARGETS).")
flags.DEFINE_integer("jobs", 2, "Targets fuzzed at a time.")
flags.DEFINE_integer("timeout_s", 10, "An input running longer is a hang.")
flags.DEFINE_integer("memory_mb", 4096, "Address space of a fuzzing or replaying process.")
flags.DEFINE_integer("seed", 1, "libFuzzer's random seed.")
flags.DEFINE_bool("save", True, "Save each new failure's input under tests/data/fuzz/<target>/.")
flags.DEFINE_bool("report", True, "Write the table to docs/BENCHMARKS.md.")
# Internal: the worker and replay processes.
flags.DEFINE_string("worker", None, "Fuzz this target (internal).")
flags.DEFINE_string("replay", None, "Run this target on the files given as arguments (internal).")
flags.DEFINE_string("state", None, "The worker's folder (internal).")
flags.DEFINE_integer("runs", 0, "The worker's executions (internal).")

# ----------------------------------------------------------------------------- targets

DICOM_SEEDS = (
    "CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm", "JPEG2000.dcm",
    "SC_rgb_jpeg_dcmtk.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_small_odd.dcm",
    "ExplVR_BigEnd.dcm", "rtplan.dcm",
)
NIFTI_SEEDS = ("anatomical.nii", "functional.nii", "resampled_anat_moved.nii", "example_nifti2.nii.gz",
               "standard.nii.gz")


def extension(data, kinds):
    """The extension a file of these bytes would have: from the DICOM preamble, the gzip,
    NIfTI, PNG, TIFF or JPEG signature, else that of the target's first seed kind."""
    if data[128:132] == b"DICM":
        return ".dcm"
    if data[:2] == b"\x1f\x8b":
        return ".nii.gz"
    if data[344:348] in (b"n+1\0", b"ni1\0") or data[4:8] == b"n+2\0":
        return ".nii"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:4] in (b"II*\0", b"MM\0*"):
        return ".tif"
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    return {"dicom": ".dcm", "nifti": ".nii", "raster": ".png"}[kinds[0]]


def file_name(name, data):
    _, _, kinds, by_content = targets()[name]
    return "input" + (extension(data, kinds) if by_content else "")


def chain(exc):
    """``exc`` and the exceptions it was raised from."""
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def where(exc):
    """Where ``exc`` was raised, and the last sr_tf line it passed through."""
    frames = traceback.extract_tb(exc.__traceback__)

    def short(frame):
        name = frame.filename.split("site-packages" + os.sep)[-1]
        return f"{os.path.relpath(name, ROOT) if name.startswith(ROOT) else name}:{frame.lineno} ({frame.name})"

    ours = [f for f in frames if f.filename.startswith(os.path.join(ROOT, "sr_tf"))]
    return short(frames[-1]) if frames else "?", short(ours[-1]) if ours else None


def classify(name, path):
    """``(outcome, failure)`` of target ``name`` on ``path``: outcome ``refused`` (the named
    error) or ``read`` with failure None, else ``failure`` and ``{"key", "type", "message"}``,
    whose key tells distinct failures apart."""
    call, error, _, _ = targets()[name]
    try:
        call(path)
    except BaseException as exc:  # anything but the named error is what we look for (a Rust panic is no Exception)
        if isinstance(exc, KeyboardInterrupt):
            raise
        memory = next((e for e in chain(exc) if isinstance(e, MemoryError)), None)
        if error is not None and isinstance(exc, error) and memory is None:
            return "refused", None
        culprit = memory or exc
        raised, ours = where(culprit)
        key = f"{type(culprit).__name__} at {raised}" + (f" via {ours}" if ours and ours != raised else "")
        return "failure", {"key": key, "type": type(culprit).__name__, "message": str(exc)[:500]}
    return "read", None


def limit_memory(megabytes):
    size = megabytes << 20
    resource.setrlimit(resource.RLIMIT_AS, (size, size))


# ----------------------------------------------------------------------------- seeds


def seed_files(folder):
    """{kind: [paths]} of the seed files, written into ``folder``."""
    import cv2
    import nibabel
    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    seeds = {"dicom": [os.fspath(get_testdata_file(n)) for n in DICOM_SEEDS], "nifti": [], "raster": []}
    # A radiograph (CR, MONOCHROME1, 15 bits) cut to 64 x 64: the whole file is 7 MB.
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[900:964, 900:964]).tobytes()
    ds.Rows = ds.Columns = 64
    seeds["dicom"].append(os.path.join(folder, "RG1_UNCI_64.dcm"))
    ds.save_as(seeds["dicom"][-1])
    data = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data")
    seeds["nifti"] = [os.path.join(data, n) for n in NIFTI_SEEDS]
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array[32:96, 32:96].astype(np.uint16)
    rgb = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")).pixel_array[:64, :64]
    grey8 = (ct >> 4).astype(np.uint8)
    encoded = {
        "ct8.png": cv2.imencode(".png", grey8)[1], "ct16.png": cv2.imencode(".png", ct)[1],
        "rgb.png": cv2.imencode(".png", rgb[..., ::-1])[1], "ct8.jpg": cv2.imencode(".jpg", grey8)[1],
        "rgb.jpg": cv2.imencode(".jpg", rgb[..., ::-1])[1], "ct16.tif": cv2.imencode(".tif", ct)[1],
        "float.tif": cv2.imencode(".tif", ct.astype(np.float32) / 7.0)[1],
    }
    for name, buffer in encoded.items():
        seeds["raster"].append(os.path.join(folder, name))
        with open(seeds["raster"][-1], "wb") as f:
            f.write(buffer.tobytes())
    for name, compression in (("rgba_deflate.tif", "tiff_adobe_deflate"), ("ct8_packbits.tif", "packbits")):
        seeds["raster"].append(os.path.join(folder, name))
        image = Image.fromarray(np.dstack([rgb, grey8])) if name.startswith("rgba") else Image.fromarray(grey8)
        image.save(seeds["raster"][-1], compression=compression)
    return seeds


# ----------------------------------------------------------------------------- the worker


def save_failure(folder, data, name, failure):
    """Keep the input of a failure: ``<folder>/<hash><ext>``, and the failure in ``<hash>.json``."""
    digest = hashlib.sha256(data).hexdigest()[:12]
    os.makedirs(folder, exist_ok=True)
    failure = dict(failure, file=digest + file_name(name, data).removeprefix("input"))
    with open(os.path.join(folder, failure["file"]), "wb") as f:
        f.write(data)
    with open(os.path.join(folder, digest + ".json"), "w", encoding="utf-8") as f:
        json.dump(failure, f)


def known_failures(folder):
    return {json.load(open(p, encoding="utf-8"))["key"] for p in glob.glob(os.path.join(folder, "*.json"))}


def fuzz_worker(name, state, runs):
    """One libFuzzer run of target ``name``: counts executions and their time in
    ``state/progress`` and keeps each new exception's input in ``state/found``; a crash,
    hang or out-of-memory ends the process with libFuzzer's artifact in ``state/artifacts``."""
    import atheris

    limit_memory(FLAGS.memory_mb)
    warnings.simplefilter("ignore")  # pydicom and nibabel warn at every other mutated input
    found = os.path.join(state, "found")
    seen = known_failures(found)
    scratch = tempfile.mkdtemp(prefix="fuzz-")
    corpus = os.path.join(state, "corpus")
    with atheris.instrument_imports(include=INSTRUMENTED):
        targets()
        for seed in sorted(glob.glob(os.path.join(corpus, "*"))):
            classify(name, seed)  # imports the decoders each seed needs, instrumented
    with open(os.path.join(state, "progress"), "r+b") as f:
        progress = mmap.mmap(f.fileno(), 16)
    count, seconds = struct.unpack_from("<Qd", progress)

    def one_input(data):
        nonlocal count, seconds
        start = time.perf_counter()
        path = os.path.join(scratch, file_name(name, data))
        with open(path, "wb") as f:
            f.write(data)
        _, failure = classify(name, path)
        os.remove(path)
        if failure is not None and failure["key"] not in seen:
            seen.add(failure["key"])
            save_failure(found, data, name, failure)
        count, seconds = count + 1, seconds + time.perf_counter() - start
        struct.pack_into("<Qd", progress, 0, count, seconds)

    max_len = max(os.path.getsize(p) for p in glob.glob(os.path.join(corpus, "*")))
    atheris.Setup([sys.argv[0], corpus, f"-runs={runs}", f"-timeout={FLAGS.timeout_s}",
                   f"-rss_limit_mb={FLAGS.memory_mb}", f"-max_len={max_len}", f"-seed={FLAGS.seed}",
                   f"-artifact_prefix={os.path.join(state, 'artifacts')}{os.sep}", "-print_final_stats=1"],
                  one_input)
    atheris.Fuzz()


def replay_worker(name, paths):
    """Print one JSON line per file: ``{"path", "outcome", "failure"}``."""
    limit_memory(FLAGS.memory_mb)
    warnings.simplefilter("ignore")
    for path in paths:
        outcome, failure = classify(name, path)
        print(json.dumps({"path": path, "outcome": outcome, "failure": failure}), flush=True)


def replay(name, path):
    """Target ``name`` on one file in a fresh process under the limits: ``(outcome, failure)``
    as :func:`classify` gives them, with a crash or a hang as failures too."""
    command = [sys.executable, "-X", "faulthandler", "-m", "bench.fuzz", f"--replay={name}",
               f"--memory_mb={FLAGS.memory_mb}", path]
    try:
        done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True,
                              timeout=FLAGS.timeout_s + STARTUP_S)
    except subprocess.TimeoutExpired:
        return "failure", {"key": f"hang over {FLAGS.timeout_s} s", "type": "hang", "message": ""}
    if done.returncode == 0:
        result = json.loads(done.stdout.strip().splitlines()[-1])
        return result["outcome"], result["failure"]
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    frames = [line for line in lines if line.startswith("File ")]  # faulthandler: innermost first
    kind = signal.Signals(-done.returncode).name if done.returncode < 0 else f"exit status {done.returncode}"
    return "failure", {"key": kind + (f" at {frames[0]}" if frames else ""), "type": kind,
                       "message": lines[-1] if lines else ""}


# ----------------------------------------------------------------------------- the driver


def fuzz_target(name, seeds, folder):
    """Fuzz target ``name`` for ``--executions`` inputs, restarting the worker after each
    crash, hang or out-of-memory; returns (executions, seconds, [failure]), one failure
    per distinct key, its input in ``input``."""
    state = os.path.join(folder, name)
    corpus, artifacts, found = (os.path.join(state, d) for d in ("corpus", "artifacts", "found"))
    for d in (corpus, artifacts):
        os.makedirs(d)
    _, _, kinds, _ = targets()[name]
    for kind in kinds:
        for path in seeds[kind]:
            shutil.copy(path, os.path.join(corpus, os.path.basename(path)))
    with open(os.path.join(state, "progress"), "wb") as f:
        f.write(struct.pack("<Qd", 0, 0.0))
    command = [sys.executable, "-m", "bench.fuzz", f"--worker={name}", f"--state={state}",
               f"--timeout_s={FLAGS.timeout_s}", f"--memory_mb={FLAGS.memory_mb}", f"--seed={FLAGS.seed}"]
    count = 0
    while count < FLAGS.executions:
        with open(os.path.join(state, "worker.log"), "a") as log:
            done = subprocess.run(command + [f"--runs={FLAGS.executions - count}"], cwd=ROOT, env=ENV,
                                  stdout=log, stderr=subprocess.STDOUT)
        before = count
        with open(os.path.join(state, "progress"), "rb") as f:
            count, seconds = struct.unpack("<Qd", f.read(16))
        for artifact in sorted(glob.glob(os.path.join(artifacts, "*"))):
            data = open(artifact, "rb").read()
            path = os.path.join(state, file_name(name, data))
            shutil.move(artifact, path)
            _, failure = replay(name, path)
            kind = os.path.basename(artifact).split("-")[0]  # crash, timeout, oom
            failure = failure or {"key": f"{kind} (did not happen again in a fresh process)", "type": kind,
                                  "message": ""}
            if failure["key"] not in known_failures(found):
                save_failure(found, data, name, failure)
            os.remove(path)
        if done.returncode == 0 or count == before:
            break  # done, or a crash before any execution (a seed): starting again would not help
    failures = [json.load(open(p, encoding="utf-8")) for p in sorted(glob.glob(os.path.join(found, "*.json")))]
    return count, seconds, [dict(f, input=os.path.join(found, f["file"])) for f in failures]


def saved_inputs(name):
    return sorted(glob.glob(os.path.join(FUZZ_DATA, name, "*")))


def run_target(name, seeds, folder):
    count, seconds, failures = fuzz_target(name, seeds, folder)
    if FLAGS.save:
        for failure in failures:
            os.makedirs(os.path.join(FUZZ_DATA, name), exist_ok=True)
            shutil.copy(failure["input"], os.path.join(FUZZ_DATA, name, os.path.basename(failure["input"])))
    outcomes = {path: replay(name, path) for path in saved_inputs(name)}
    return {"target": name, "executions": count, "rate": count / seconds if seconds else 0.0,
            "failures": failures, "saved": len(outcomes),
            "refused": sum(outcome == "refused" for outcome, _ in outcomes.values()),
            "read": sum(outcome == "read" for outcome, _ in outcomes.values()),
            "remaining": {os.path.relpath(p, ROOT): f for p, (outcome, f) in outcomes.items() if f is not None},
            "unsaved": 0 if FLAGS.save else len(failures)}


def main(argv):
    if FLAGS.worker:
        return fuzz_worker(FLAGS.worker, FLAGS.state, FLAGS.runs)
    if FLAGS.replay:
        return replay_worker(FLAGS.replay, argv[1:])
    if importlib.util.find_spec("atheris") is None:
        raise app.UsageError("bench.fuzz needs atheris: pip install atheris")
    names = FLAGS.targets or list(TARGETS)
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        raise app.UsageError(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fuzz-") as folder:
        seeds = seed_files(os.path.join(folder, "seeds"))
        with concurrent.futures.ThreadPoolExecutor(FLAGS.jobs) as pool:
            futures = [pool.submit(run_target, name, seeds, folder) for name in names]
            rows = []
            for future in futures:
                row = future.result()
                rows.append(row)
                print(f"{row['target']}: {row['executions']} executions, {row['rate']:.0f}/s, "
                      f"{len(row['failures'])} distinct failures; of {row['saved']} saved failing inputs "
                      f"{row['refused']} now give the named error and {row['read']} read", flush=True)
                for failure in row["failures"]:
                    print(f"  {failure['key']}: {failure['message'][:200]}")
                for path, failure in row["remaining"].items():
                    print(f"  still failing: {path}: {failure['key']}")
    minutes = (time.perf_counter() - start) / 60
    print(f"{minutes:.1f} minutes")
    if FLAGS.report:
        report(rows, minutes)


def report(rows, minutes):
    from importlib.metadata import version

    errors = {"detect_format": "(none)", "load": "`UpscaleError`"}
    table = "\n".join(
        f"| `{r['target']}` | {errors.get(r['target'], '`InputError`')} | {r['executions']} | {r['rate']:.0f} "
        f"| {len(r['failures'])} | {r['saved']} | {r['refused']} | {r['read']} |"
        for r in rows
    )
    remaining = sum(len(r["remaining"]) + r["unsaved"] for r in rows)
    update_section(
        "fuzz",
        f"""## Fuzzing the readers

`python -m bench.fuzz --executions={FLAGS.executions}` on {machine()}; atheris {version('atheris')}
(libFuzzer, seed {FLAGS.seed}), {FLAGS.jobs} targets at a time, {minutes:.1f} minutes in all. Inputs are
mutations of real DICOM, NIfTI, PNG, JPEG and TIFF files; a failure is anything but the
target's named error: another exception, a named error raised from a MemoryError, a
crash, a hang over {FLAGS.timeout_s} s, or memory over {FLAGS.memory_mb} MB (RLIMIT_AS). Exec/s is
per core: inputs over the time spent writing each to its file and running the target
on it (not the fuzzer's own).

| target | named error | executions | exec/s | failures this run | failing inputs saved | now named error | now read |
|---|---|---|---|---|---|---|---|
{table}

The saved inputs (tests/data/fuzz/<target>/) are the distinct failures of earlier runs,
each fixed in the reader and replayed here in a fresh process under the same limits;
tests/sr_tf/io/test_untrusted_inputs.py runs them, and lists those now read with the reason
reading them is right. Failures remaining: {remaining}.
""",
    )


if __name__ == "__main__":
    app.run(main)
