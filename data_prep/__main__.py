"""Convert DICOM, NIfTI and PNG/JPEG/TIFF X-rays into sharded TFRecords.

    python -m data_prep --input=PATH [--input=PATH ...] --output=tfrecords/NAME
    python -m data_prep --samples --output=tfrecords/samples
    python -m data_prep --samples --output=tfrecords/samples --runner=beam --workers=2

Inputs may be files, folders (searched recursively) or glob patterns; several may be
given as repeated flags or comma-separated. Inputs that fail are listed in the
manifest with their reason; the exit code is 0 when at least one image was written.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("input", [], "Files, folders (recursive) or glob patterns to convert; repeat the "
                          "flag or separate with commas.")
flags.DEFINE_string("output", None, "Output folder (shards + manifest.json).")
flags.DEFINE_bool("samples", False, "Convert the embedded sample set (pydicom-data, nilearn).")
flags.DEFINE_float("val_fraction", 0.1, "Fraction of patients in the validation split.")
flags.DEFINE_float("test_fraction", 0.1, "Fraction of patients in the test split.")
flags.DEFINE_string("split_file", None, "JSON {patient_id: split} or CSV lines patient_id,split "
                    "fixing the split of the patients it names; others are hashed.")
flags.DEFINE_list("intensity_range", None, "lo,hi physical range mapped to [0, 65535]; overrides "
                  "the modality defaults (CT -1024,3071 HU; X-ray 0,2**BitsStored-1; MR 0,p99.9).")
flags.DEFINE_enum("slice_axis", "axial", ["axial", "coronal", "sagittal"], "NIfTI slicing axis (RAS).")
flags.DEFINE_string("volume_index", "0", "For 4-D NIfTI: the volume to convert, or 'all'.")
flags.DEFINE_string("modality", None, "Modality of NIfTI and raster inputs (e.g. CT, MR, DX); "
                    "default: NIfTI CT detected from the value range, else MR; raster DX.")
flags.DEFINE_string("patient_id_regex", None, "Regex on the file name of NIfTI/raster inputs whose "
                    r"first group is the patient id (e.g. '^(\d+)_' for NIH ChestX-ray14).")
flags.DEFINE_float("shard_size_mb", 100.0, "Approximate shard size in MB.")
flags.DEFINE_integer("workers", 1, "Reader processes (--runner=local), or Beam workers on this machine "
                     "(--runner=beam without a runner in --beam_pipeline_options).")
flags.DEFINE_enum("runner", "local", ["local", "beam"], "local: reader processes of this machine; beam: an "
                  "Apache Beam pipeline (pip install -r requirements-beam.txt).")
flags.DEFINE_string("beam_pipeline_options", None, "With --runner=beam: Beam pipeline options as key=value "
                    "items separated by commas, e.g. runner=DataflowRunner,project=P,region=R,"
                    "temp_location=gs://B/tmp. Default: Beam's FnApiRunner on this machine with --workers "
                    "processes.")
flags.DEFINE_bool("strict", False, "Stop at the first failed input and publish nothing.")
flags.DEFINE_bool("keep_empty", False, "Keep constant (empty) slices instead of skipping them.")
flags.DEFINE_integer("max_pixels", 100_000_000, "Refuse any image (slice, frame) whose header claims more pixels "
                     "than this, or a file (all frames, all NIfTI voxels) more than ten times this, "
                     "before decoding it (0: no limit).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")


def options_from_flags():
    from sr_tf import conversion as convert
    from sr_tf.io import samples

    split_map = {}
    if FLAGS.samples:
        split_map.update(samples.SAMPLE_SPLITS)
    if FLAGS.split_file:
        split_map.update(convert.load_split_file(FLAGS.split_file))
    intensity_range = None
    if FLAGS.intensity_range:
        if len(FLAGS.intensity_range) != 2:
            raise app.UsageError("--intensity_range takes two numbers: lo,hi")
        intensity_range = tuple(float(v) for v in FLAGS.intensity_range)
    volume_index = FLAGS.volume_index if FLAGS.volume_index == "all" else int(FLAGS.volume_index)
    return convert.Options(
        val_fraction=FLAGS.val_fraction,
        test_fraction=FLAGS.test_fraction,
        intensity_range=intensity_range,
        slice_axis=FLAGS.slice_axis,
        volume_index=volume_index,
        modality=FLAGS.modality.upper() if FLAGS.modality else None,
        patient_id_regex=FLAGS.patient_id_regex,
        split_map=split_map or None,
        shard_size_mb=FLAGS.shard_size_mb,
        workers=FLAGS.workers,
        runner=FLAGS.runner,
        strict=FLAGS.strict,
        keep_empty=FLAGS.keep_empty,
        max_pixels=FLAGS.max_pixels,
    )


def summarize(manifest, output):
    counts = manifest["counts"]
    stats = manifest.get("stats", {})
    print(f"wrote {sum(counts.values())} records to {output}: "
          + ", ".join(f"{split} {n}" for split, n in counts.items())
          + f" in {len(manifest['shards'])} shard(s)")
    if stats.get("clipped_pixels"):
        print(f"clipped {stats['clipped_pixels']} pixel(s) outside the intensity range")
    if stats.get("skipped_empty_slices"):
        print(f"skipped {stats['skipped_empty_slices']} constant (empty) slice(s)")
    for item in stats.get("skipped_files", []):
        print(f"skipped {item['input']}: {item['reason']}")
    if manifest["failed"]:
        print(f"{len(manifest['failed'])} input(s) failed:")
        for item in manifest["failed"]:
            print(f"  {item['input']}: {item['reason']}")


def main(argv):
    from sr_tf import conversion as convert
    from sr_tf.io import samples

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.output:
        raise app.UsageError("--output is required")
    inputs = [part.strip() for value in FLAGS.input for part in value.split(",") if part.strip()]
    if FLAGS.samples:
        inputs += samples.sample_paths()
    if not inputs:
        raise app.UsageError("give --input=PATH (files, folders or globs) or --samples")
    if FLAGS.beam_pipeline_options and FLAGS.runner != "beam":
        raise app.UsageError("--beam_pipeline_options needs --runner=beam")
    try:
        options = options_from_flags()
        manifest = convert.convert(inputs, FLAGS.output, options, progress=FLAGS.progress,
                                   beam_options=FLAGS.beam_pipeline_options)
    except (convert.ConversionError, ValueError, OSError) as exc:
        logging.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summarize(manifest, FLAGS.output)
    return 0


if __name__ == "__main__":
    app.run(main)
