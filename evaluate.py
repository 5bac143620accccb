"""Evaluate a model against interpolation baselines, honestly.

    python evaluate.py                                   # latest run, its data's test split
    python evaluate.py --model=runs/swift_srgan_x4 --data=tfrecords/samples --output=results/swift
    python evaluate.py --model=saved_models/swift/model_float16.tflite --data=tfrecords/cxr14

--model takes a run folder, a .keras file, a SavedModel folder or a .tflite file.
Writes per_image.csv, summary.md and figures to --output and prints a summary. With
--consistency=project (the default) the model is reported twice: as it is ("model") and
followed by data-consistency projection ("model+projection"). --ensemble adds the model
averaged over the 8 flips and rotations ("model+ensemble"), --adapt_steps=N a copy of
the model adapted to each image first ("model+adaptation"), each with its time per image.
"""

import glob
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from sr_tf import consistency, inference, records  # noqa: E402
from sr_tf.data import presets  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Run folder, .keras, SavedModel folder, .tflite or zoo name; default: latest run in runs/.")
flags.DEFINE_string("data", None, "data_prep output folder; default: the run's training data or tfrecords/samples.")
flags.DEFINE_enum("split", "test", list(records.SPLITS), "Split to evaluate.")
flags.DEFINE_string("output", None, "Results folder; default: <run>/eval or results/<model name>.")
flags.DEFINE_enum("degradation", None, list(presets.PRESETS), "Degradation; default: the one the model trained with.")
flags.DEFINE_enum("scale", None, [str(s) for s in presets.SCALES], "Scale; default: the model's.")
flags.DEFINE_integer("seed", 0, "Degradation seed (the same as training's validation by default).")
flags.DEFINE_integer("tile", inference.DEFAULT_TILE, "LR tile size for tiled inference of large images.")
flags.DEFINE_integer("overlap", inference.DEFAULT_OVERLAP, "LR tile overlap.")
flags.DEFINE_integer("max_images", 0, "Evaluate at most this many images (0: all).")
flags.DEFINE_integer("figures", 4, "Comparison figures for the first N images.")
consistency.define_flags("project: report the model and the model followed by data-consistency projection "
                         "(model+projection); none: the model alone.")
flags.adopt_module_key_flags(consistency)  # --help lists them as this script's flags
flags.DEFINE_bool("ensemble", False, "Also report the model averaged over the 8 flips and rotations (model+ensemble).")
flags.DEFINE_integer("adapt_steps", 0, "Also report a copy of the model adapted to each image for this many "
                     "self-supervised steps (model+adaptation; 0: off; Keras models only).")
flags.DEFINE_float("adapt_seconds", None, "At most this many seconds of adaptation per image (default: 60).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_bool("verify_shards", True, "Check every shard's SHA-256 against the manifest first "
                  "(sizes are always checked).")


def latest_run(root="runs"):
    runs = [os.path.dirname(p) for p in glob.glob(os.path.join(root, "*", "generator.keras"))]
    if not runs:
        raise ValueError(f"no trained run found under {root}/ (train one with `python train.py`, or pass --model)")
    return max(runs, key=lambda d: os.path.getmtime(os.path.join(d, "generator.keras")))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from sr_tf import evaluation, inference

    try:
        model_path = FLAGS.model or latest_run()
        predictor = inference.load_predictor(model_path)
        trained = predictor.config or {}
        degradation = FLAGS.degradation or trained.get("degradation", "bicubic")
        scale = int(FLAGS.scale or trained.get("scale") or predictor.scale)
        config = evaluation.EvalConfig(
            data=FLAGS.data or trained.get("data") or os.path.join("tfrecords", "samples"),
            split=FLAGS.split, scale=scale, degradation=degradation, seed=FLAGS.seed, tile=FLAGS.tile,
            overlap=FLAGS.overlap, max_images=FLAGS.max_images, figures=FLAGS.figures,
            verify_shards=FLAGS.verify_shards, consistency=FLAGS.consistency,
            consistency_iterations=FLAGS.consistency_iterations, consistency_step=FLAGS.consistency_step,
            ensemble=FLAGS.ensemble, adapt_steps=FLAGS.adapt_steps, adapt_seconds=FLAGS.adapt_seconds,
            adapt_seed=FLAGS.seed,
        )
        if FLAGS.output:
            output = FLAGS.output
        elif os.path.isdir(model_path) and os.path.exists(os.path.join(model_path, "config.json")):
            output = os.path.join(model_path, "eval")
        else:
            output = os.path.join("results", predictor.name)
        _, summary = evaluation.run(predictor, config, output, progress=FLAGS.progress)
    except (ValueError, OSError) as exc:  # RecordsError, EvaluationError, model load errors
        logging.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{predictor.name} on {config.data} ({config.split}), x{config.scale}, {config.degradation}:")
    print(evaluation.console_summary(summary))
    print(f"results in {output}")
    return 0


if __name__ == "__main__":
    app.run(main)
