"""Conversion speed of the embedded sample set with one and two reader processes.

    python -m bench.data_prep [--repeats=3]

Prints slices per second for --workers=1 and --workers=2 and their ratio (measured in
the same run, alternating, so machine load affects both alike), for the sample set as
it is and for eight copies of it (enough files to keep two processes busy), and writes
the figures to docs/BENCHMARKS.md.
"""

import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from bench.report import machine, update_section  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 3, "Timed runs per worker count (median reported).")
flags.DEFINE_integer("copies", 8, "Copies of the sample set in the larger measurement.")


def convert_once(workers, paths, split_map, **options):
    """(slices written, seconds) of one conversion into a temporary folder; ``options``
    are further ``conversion.Options``."""
    from sr_tf import conversion as convert

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        manifest = convert.convert(paths, out, convert.Options(workers=workers, split_map=split_map, **options),
                                   progress=False)
        elapsed = time.perf_counter() - start
    return sum(manifest["counts"].values()), elapsed


def measure(paths, split_map, repeats):
    """Median slices/s for one and two workers, alternating runs."""
    rates = {1: [], 2: []}
    slices = 0
    for _ in range(repeats):
        for workers in (1, 2):
            slices, elapsed = convert_once(workers, paths, split_map)
            rates[workers].append(slices / elapsed)
    return slices, statistics.median(rates[1]), statistics.median(rates[2])


def replicate(paths, copies, folder):
    """``copies`` copies of the sample files under distinct names (one folder per copy)."""
    out = []
    for k in range(copies):
        sub = os.path.join(folder, f"copy{k}")
        os.makedirs(sub)
        for path in paths:
            target = os.path.join(sub, os.path.basename(path))
            shutil.copy(path, target)
            out.append(target)
    return out


def main(argv):
    del argv
    from sr_tf.io import samples

    paths = samples.sample_paths()
    convert_once(1, paths, samples.SAMPLE_SPLITS)  # warm-up: imports, file cache
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        sets = [("sample set", paths), (f"sample set x{FLAGS.copies}", replicate(paths, FLAGS.copies, folder))]
        for name, files in sets:
            slices, one, two = measure(files, samples.SAMPLE_SPLITS, FLAGS.repeats)
            rows.append((name, len(files), slices, one, two))
            print(f"{name} ({slices} slices, {len(files)} files): workers=1 {one:.1f} slices/s, "
                  f"workers=2 {two:.1f} slices/s, ratio {two / one:.2f}")
    table = "\n".join(
        f"| {name} | {files} | {slices} | {one:.1f} | {two:.1f} | {two / one:.2f} |"
        for name, files, slices, one, two in rows
    )
    update_section(
        "data_prep",
        f"""## data_prep: sample set conversion

`python -m bench.data_prep` on {machine()}; median of {FLAGS.repeats} alternating runs,
in-process after a warm-up (worker start-up included).

| input | files | slices | workers=1 slices/s | workers=2 slices/s | ratio 2/1 |
|---|---|---|---|---|---|
{table}

The sample set alone is five files, one of which (the MNI152 volume, 155 non-empty
slices) is most of the work and one task, so a second process mostly adds its start-up
cost there; with more files than processes the second core pays off.
""",
    )


if __name__ == "__main__":
    app.run(main)
