"""Training input throughput: ``make_dataset`` against a per-sample Python loader.

    python -m bench.pipeline [--records=tfrecords/samples] [--rounds=3] [--seconds=8]

Both produce (lr, hr) batches of the train split (patch 96, scale 4, batch 16, bicubic
by default) from the same images. The naive loader is written the way many student
projects are: per sample, in a Python loop, it opens the source file the record came
from (pydicom / nibabel / cv2), normalises it, takes a random crop and makes the LR
patch with ``cv2.resize``. Rounds alternate between the loaders so machine load
affects both alike; the median rate is reported. Without ``--records`` the embedded
sample set is converted into a temporary folder first (as ``python -m data_prep
--samples`` does). Figures go to docs/BENCHMARKS.md.
"""

import collections
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from absl import app, flags  # noqa: E402

from bench.report import machine, update_section  # noqa: E402
from sr_tf import intensity  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("records", None, "data_prep output folder; default: the sample set, converted now.")
flags.DEFINE_integer("patch_size", 96, "HR patch size.")
flags.DEFINE_integer("scale", 4, "Downsampling factor.")
flags.DEFINE_integer("batch_size", 16, "Patches per batch.")
flags.DEFINE_integer("rounds", 3, "Alternating timed rounds per loader (median reported).")
flags.DEFINE_float("seconds", 8.0, "Minimum duration of one timed round.")


# ----------------------------------------------------------------------------- naive loader


def read_source(source, slice_index):
    """The physical 2-D slice a record came from, read from its source file."""
    path, _, volume = source.partition("#volume=")
    if path.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        data = nib.as_closest_canonical(nib.load(path)).get_fdata()
        if volume:
            data = data[..., int(volume)]
        return np.rot90(data[:, :, slice_index])  # axial slice, displayed as data_prep stores it
    if path.lower().endswith((".png", ".jpg", ".jpeg", ".tif", ".tiff")):
        import cv2

        return cv2.imread(path, cv2.IMREAD_UNCHANGED).astype(np.float64)
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1)) > 1:
        pixels = pixels[slice_index]
    physical = apply_modality_lut(pixels, ds).astype(np.float64)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        physical = physical.max() + physical.min() - physical
    return physical


class NaiveLoader:
    """Per sample: read the source file, normalise, random crop, ``cv2.resize`` to LR."""

    def __init__(self, entries, patch_size, scale, seed=0):
        self.entries = entries
        self.patch_size = patch_size
        self.lr_size = patch_size // scale
        self.rng = np.random.default_rng(seed)
        self.seconds_by_kind = collections.defaultdict(list)

    def sample(self):
        import cv2

        start = time.perf_counter()
        entry = self.entries[self.rng.integers(len(self.entries))]
        image = read_source(entry["source"], entry["slice_index"])
        lo, hi = entry["intensity_min"], entry["intensity_max"]
        image = intensity.to_unit(image, lo, hi)
        top = self.rng.integers(image.shape[0] - self.patch_size + 1)
        left = self.rng.integers(image.shape[1] - self.patch_size + 1)
        hr = np.ascontiguousarray(image[top : top + self.patch_size, left : left + self.patch_size])
        lr = cv2.resize(hr, (self.lr_size, self.lr_size), interpolation=cv2.INTER_CUBIC)
        self.seconds_by_kind[entry["kind"]].append(time.perf_counter() - start)
        return lr[..., np.newaxis], hr[..., np.newaxis]

    def batch(self, size):
        lrs, hrs = zip(*(self.sample() for _ in range(size)))
        return np.stack(lrs), np.stack(hrs)


def train_entries(records_dir, patch_size):
    """Source, slice and intensity bounds of every train image that holds a patch."""
    from sr_tf.data import pipeline

    entries = []
    for example in pipeline.make_eval_dataset(records_dir, "train"):
        if min(int(example["height"]), int(example["width"])) < patch_size:
            continue
        source = example["source"].numpy().decode()
        entries.append(
            {
                "source": source,
                "kind": "NIfTI" if ".nii" in source else "raster" if source.lower().endswith(".png") else "DICOM",
                "slice_index": int(example["slice_index"]),
                "intensity_min": float(example["intensity_min"]),
                "intensity_max": float(example["intensity_max"]),
            }
        )
    return entries


# ----------------------------------------------------------------------------- timing


def timed_rate(next_batch, batch_size, seconds):
    """Patches per second of ``next_batch`` over at least ``seconds``."""
    batches, start = 0, time.perf_counter()
    while True:
        next_batch()
        batches += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return batches * batch_size / elapsed


def sample_records(folder):
    from sr_tf import conversion as convert
    from sr_tf.io import samples

    convert.convert(samples.sample_paths(), folder, convert.Options(split_map=samples.SAMPLE_SPLITS), progress=False)
    return folder


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as scratch:
        run(FLAGS.records or sample_records(os.path.join(scratch, "samples")))


def run(records_dir):
    from sr_tf.data import pipeline

    patch, scale, batch = FLAGS.patch_size, FLAGS.scale, FLAGS.batch_size
    entries = train_entries(records_dir, patch)
    kinds = collections.Counter(entry["kind"] for entry in entries)
    print(f"{records_dir}: {len(entries)} train images of at least {patch}x{patch} ({dict(kinds)})")

    iterators, first_batch = {}, {}
    for name, cache in (("make_dataset", "auto"), ("make_dataset, cache=False", False)):
        start = time.perf_counter()
        iterators[name] = iter(pipeline.make_dataset(records_dir, "train", scale, patch, batch, cache=cache))
        next(iterators[name])
        first_batch[name] = time.perf_counter() - start
        for _ in range(20):  # fill the cache / reach steady state
            next(iterators[name])
    naive = NaiveLoader(entries, patch, scale)
    loaders = {name: iterator.__next__ for name, iterator in iterators.items()}
    loaders["naive Python loader"] = lambda: naive.batch(batch)
    dicom = [entry for entry in entries if entry["kind"] == "DICOM"]
    if dicom and len(dicom) < len(entries):
        naive_dicom = NaiveLoader(dicom, patch, scale)
        loaders["naive Python loader, DICOM images only"] = lambda: naive_dicom.batch(batch)

    rates = collections.defaultdict(list)
    for round_index in range(FLAGS.rounds):
        for name, next_batch in loaders.items():
            rates[name].append(timed_rate(next_batch, batch, FLAGS.seconds))
            print(f"round {round_index + 1}: {name}: {rates[name][-1]:.1f} patches/s")
    median = {name: statistics.median(values) for name, values in rates.items()}
    baseline = median["naive Python loader"]
    for name, rate in median.items():
        print(f"{name}: {rate:.1f} patches/s ({rate / baseline:.1f}x the naive loader)")

    rows = "\n".join(
        f"| {name} | {rate:.0f} | {rate / baseline:.1f}x | "
        + (f"{first_batch[name]:.1f} s |" if name in first_batch else "- |")
        for name, rate in median.items()
    )
    per_sample = ", ".join(
        f"{kind} {1e3 * statistics.median(seconds):.0f} ms" for kind, seconds in sorted(naive.seconds_by_kind.items())
    )
    images = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
    dicom_rate = median.get("naive Python loader, DICOM images only")
    dicom_note = (
        ""
        if dicom_rate is None
        else f" Against that row `make_dataset` is {median['make_dataset'] / dicom_rate:.0f}x "
        f"(`cache=False`: {median['make_dataset, cache=False'] / dicom_rate:.0f}x)."
    )
    update_section(
        "pipeline",
        f"""## Input pipeline: training patches per second

`python -m bench.pipeline` on {machine()}.
Train split of the embedded sample set ({len(entries)} images of at least {patch}x{patch}: {images}),
patch {patch}, scale {scale}, batch {batch}, `bicubic`. Median of {FLAGS.rounds} alternating rounds of at
least {FLAGS.seconds:.0f} s each, after 20 warm-up batches; "first batch" includes building the
dataset and filling the shuffle buffer.

| loader | (lr, hr) patches/s | vs naive | first batch |
|---|---|---|---|
{rows}

`make_dataset` keeps the decoded sample set in memory (`cache="auto"`: shards under
{pipeline.CACHE_AUTO_LIMIT_MB} MB); with `cache=False` it decodes a 16-bit PNG for every
patch, as it must for data sets larger than memory. The naive loader opens the source
file of each sample in a Python loop (median per sample: {per_sample}). Most sample
images are slices of the MNI152 volume, and each costs the naive loader a whole-volume
read: that is what the headline ratio measures. On 2-D DICOM files the naive loader is
faster per sample (the DICOM-only row), and the margin is smaller.{dicom_note}
""",
    )


if __name__ == "__main__":
    app.run(main)
