"""Upscale DICOM, NIfTI and PNG/JPEG/TIFF files with a trained model, in their own format.

    python upscale.py --model=runs/swift_srgan_x4 --input=scans/ --output=upscaled
    python upscale.py --model=saved_models/swift/model_float16.tflite --input='cxr/*.png,ct.dcm' --output=out

--model takes a run folder, a .keras file, a SavedModel folder or a .tflite file.
--input takes files, folders (searched recursively) and glob patterns, repeated or
comma-separated. Each file is written to --output as <stem>_x<scale> in its own format
(DICOM .dcm, NIfTI .nii/.nii.gz, rasters .png); a file that fails is reported with its
reason and the others still run. Every output is projected onto data consistency
(--consistency=project, the default: degraded again, it reproduces its input;
--consistency=none for the model's output as it is). --ensemble averages the model over
the 8 flips and rotations of its input; --uncertainty (which implies it) also writes an
uncertainty map beside each output (<stem>_x<scale>_uncertainty: a NIfTI for NIfTI, a
16-bit PNG for rasters, a DICOM in its own series for DICOM). --adapt_steps=N fine-tunes a
copy of the model on each input first (per-scan self-supervised adaptation, at most
--adapt_seconds per file). upscale_report.json in --output lists every input with its
output or its error. The exit code is 0 when at least one file was written.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from sr_tf import adaptation, consistency, ensemble, inference  # noqa: E402

REPORT = "upscale_report.json"

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Run folder, .keras, SavedModel folder, .tflite or zoo name (python zoo.py lists them).")
flags.DEFINE_multi_string("input", [], "Files, folders (recursive) or glob patterns; repeat or separate with commas.")
flags.DEFINE_string("output", None, "Output folder (created if missing).")
flags.DEFINE_integer("tile", inference.DEFAULT_TILE, "LR tile size in pixels for tiled inference (bounds memory).")
flags.DEFINE_integer("overlap", inference.DEFAULT_OVERLAP, "LR pixels shared by neighbouring tiles; the seam is at its middle, so at "
                     "least twice the model's receptive-field radius.")
flags.DEFINE_integer("batch_size", inference.DEFAULT_BATCH, "Tiles per model call.")
consistency.define_flags("project: data-consistency projection after the model (its output, degraded again, reproduces "
                         "the input); none: the model's output as it is.")
flags.adopt_module_key_flags(consistency)  # --help lists them as this script's flags
flags.DEFINE_bool("ensemble", False, "Average the model over the 8 flips and rotations of its input (8x the time).")
flags.DEFINE_bool("uncertainty", False, "Also write an uncertainty map beside each output (implies --ensemble).")
flags.DEFINE_float("uncertainty_threshold", ensemble.DEFAULT_THRESHOLD, "Uncertainty (in [0, 1] units of the "
                   "window) above which a pixel counts in the report's fraction.")
flags.DEFINE_integer("adapt_steps", 0, "Fine-tune a copy of the model on each input for this many self-supervised "
                     "steps before upscaling it (0: off; Keras models only; an input under "
                     f"{adaptation.MIN_PAIR_SIDE} px times the scale on its smaller side fails with the reason).")
flags.DEFINE_float("adapt_seconds", adaptation.DEFAULT_SECONDS, "At most this many seconds of adaptation per file.")
flags.DEFINE_integer("seed", 0, "Seed of the adaptation's crops and degradations.")
flags.DEFINE_string("modality", None, "Modality of NIfTI and raster inputs (e.g. CT, MR, DX), as data_prep's "
                    "--modality; default: NIfTI CT detected from the value range, else MR; raster DX.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_integer("max_pixels", 100_000_000, "Refuse any input image (slice, frame) whose header claims more "
                     "pixels than this, or a file (all frames, all NIfTI voxels) more than ten times this, "
                     "before decoding it (0: no limit).")


def collect_inputs(inputs, output_dir):
    """Files to upscale from the --input values; returns (files, failures, skipped).

    Unknown formats are failures when named explicitly and skipped when found in a
    folder or by a glob, as are files found inside the output folder (earlier outputs).
    """
    from sr_tf import conversion as convert
    from sr_tf.io import readers

    items = [part.strip() for value in inputs for part in value.split(",") if part.strip()]
    found, missing = convert.expand_inputs(items)
    failures = [{"input": item, "status": "failed", "output": None, "error": f"{item}: {reason}"}
                for item, reason in missing]
    explicit = {os.path.abspath(os.path.expanduser(item)) for item in items}
    output_root = os.path.join(os.path.abspath(output_dir), "")
    files, skipped = [], []
    for path in found:
        named = os.path.abspath(path) in explicit
        problem = readers.not_a_regular_file(path)
        if not named and os.path.abspath(path).startswith(output_root):
            skipped.append({"input": path, "reason": "inside the output folder"})
        elif problem is not None:  # a broken link fails; a FIFO, socket or device is never opened
            broken, reason = problem
            if broken or named:
                failures.append({"input": path, "status": "failed", "output": None, "error": f"{path}: {reason}"})
            else:
                skipped.append({"input": path, "reason": reason})
        elif readers.detect_format(path) is None:
            reason = "unknown format (expected DICOM, NIfTI .nii/.nii.gz, or PNG/JPEG/TIFF)"
            if named:
                failures.append({"input": path, "status": "failed", "output": None, "error": f"{path}: {reason}"})
            else:
                skipped.append({"input": path, "reason": reason})
        else:
            files.append(path)
    return files, failures, skipped


def unique_output(path, claimed):
    """``path``, or ``<stem>-2<ext>``, ``-3``, ... when an earlier input of this run took it."""
    from sr_tf.upscaling import split_extension

    stem, ext = split_extension(path)
    candidate, n = path, 1
    while os.path.abspath(candidate) in claimed:
        n += 1
        candidate = f"{stem}-{n}{ext}"
    claimed.add(os.path.abspath(candidate))
    return candidate


def series_windows(files):
    """``{path: window}`` for the files that are slices of one DICOM series (grouped as
    conversion groups them: ``sr_tf.conversion.plan_tasks``): the series' one intensity
    window (``readers.series_window``), so that each file reaches the model mapped as the
    series was mapped into records, not through a window of its own."""
    from sr_tf import conversion
    from sr_tf.io import readers

    tasks, _, _ = conversion.plan_tasks(files)
    windows = {}
    for task in tasks:
        if task.kind == "dicom_series":
            window = readers.series_window(task.paths)
            windows.update({path: window for path in task.paths})
    return windows


def run(predictor, files, output_dir, tile, overlap, batch_size, progress=True, adapt=None, uncertainty=False,
        threshold=None, modality=None):
    """Upscale ``files`` one by one; returns their report dicts. ``modality``: of NIfTI and
    raster inputs (default: NIfTI CT detected from the values, else MR; raster DX)."""
    from tqdm import tqdm

    from sr_tf import upscaling

    windows = series_windows(files)

    # Inputs are claimed first, so no output name can fall on an input file.
    reports, claimed = [], {os.path.abspath(p) for p in files}
    with tqdm(total=len(files), desc="upscale", unit="file", disable=not progress, leave=False) as bar:
        for path in files:
            bar.set_postfix_str(os.path.basename(path))

            def tiles(done, total):
                bar.set_postfix_str(f"{os.path.basename(path)} tile {done}/{total}")

            target = unique_output(upscaling.output_path(path, output_dir, predictor.scale), claimed)
            if uncertainty:
                beside = os.path.abspath(upscaling.uncertainty_path(target))
                if beside in claimed:  # an input, or another file's output, of that name
                    reports.append({"input": path, "status": "failed", "output": None,
                                    "error": f"{path}: its uncertainty map would overwrite {beside}"})
                    bar.update(1)
                    continue
                claimed.add(beside)
            reports.append(upscaling.upscale_file(predictor, path, output_dir, tile, overlap, batch_size,
                                                  output=target, progress=tiles, adapt=adapt,
                                                  uncertainty=uncertainty, threshold=threshold,
                                                  modality=modality, window=windows.get(path)))
            bar.update(1)
    return reports


def summarize(files, skipped, output_dir):
    written = [f for f in files if f["status"] == "ok"]
    for item in files:
        if item["status"] == "ok":
            print(f"ok      {item['input']} -> {item['output']} ({item['seconds']:.1f} s)")
            if "uncertainty" in item:
                u = item["uncertainty"]
                print(f"        uncertainty -> {u['output']} ({100 * u['fraction_above']:.2f} % of pixels above "
                      f"{u['threshold']:g})")
        else:
            print(f"FAILED  {item['error']}")
    for item in skipped:
        print(f"skipped {item['input']}: {item['reason']}")
    print(f"upscaled {len(written)} of {len(files)} file(s) into {output_dir}; "
          f"report: {os.path.join(output_dir, REPORT)}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.model or not FLAGS.output or not FLAGS.input:
        raise app.UsageError("--model, --input and --output are required")
    from sr_tf.io.files import write_json_atomic

    try:
        inference.check_tiling(FLAGS.tile, FLAGS.overlap, FLAGS.batch_size)
    except ValueError as exc:
        raise app.UsageError(str(exc)) from exc
    try:
        consistency.check(FLAGS.consistency, FLAGS.consistency_iterations, FLAGS.consistency_step)
    except consistency.ConsistencyError as exc:
        raise app.UsageError(str(exc)) from exc
    try:
        adaptation.check(FLAGS.adapt_steps, FLAGS.adapt_seconds)
    except ValueError as exc:
        raise app.UsageError(f"--{exc}") from exc
    if not FLAGS.uncertainty_threshold >= 0:
        raise app.UsageError(f"--uncertainty_threshold must be >= 0, got {FLAGS.uncertainty_threshold}")
    if FLAGS.max_pixels < 0:
        raise app.UsageError(f"--max_pixels must be 0 (no limit) or positive, got {FLAGS.max_pixels}")
    from sr_tf.io import readers

    readers.max_pixels_limit = FLAGS.max_pixels
    files, failures, skipped = collect_inputs(FLAGS.input, FLAGS.output)
    try:
        predictor = inference.load_predictor(FLAGS.model)  # before --output exists: a bad model writes nothing
        if FLAGS.adapt_steps and not isinstance(predictor, inference.KerasPredictor):
            raise ValueError(f"--adapt_steps needs a Keras model (.keras, a run folder or a zoo name); "
                             f"{predictor.path} is a {predictor.kind} model")
        if FLAGS.ensemble or FLAGS.uncertainty:
            predictor = ensemble.EnsemblePredictor(predictor, spread=FLAGS.uncertainty)
        predictor = inference.with_consistency(predictor, FLAGS.consistency, FLAGS.consistency_iterations,
                                               FLAGS.consistency_step)
        scale = predictor.scale
        os.makedirs(FLAGS.output, exist_ok=True)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    adapt = (dict(steps=FLAGS.adapt_steps, seconds=FLAGS.adapt_seconds, seed=FLAGS.seed)
             if FLAGS.adapt_steps else None)
    results = failures + run(predictor, files, FLAGS.output, FLAGS.tile, FLAGS.overlap, FLAGS.batch_size,
                             progress=FLAGS.progress, adapt=adapt, uncertainty=FLAGS.uncertainty,
                             threshold=FLAGS.uncertainty_threshold,
                             modality=FLAGS.modality.upper() if FLAGS.modality else None)
    written = sum(item["status"] == "ok" for item in results)
    write_json_atomic(os.path.join(FLAGS.output, REPORT), {
        "model": FLAGS.model, "model_name": predictor.name, "scale": scale, "tile": FLAGS.tile,
        "overlap": FLAGS.overlap, "batch_size": FLAGS.batch_size,
        "consistency": predictor.projection.card() if predictor.projection else {"mode": "none"},
        "ensemble": bool(FLAGS.ensemble or FLAGS.uncertainty), "adapt": adapt, "written": written,
        "failed": len(results) - written, "files": results, "skipped": skipped,
    })
    summarize(results, skipped, FLAGS.output)
    return 0 if written else 1


if __name__ == "__main__":
    app.run(main)
