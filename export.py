"""Export a trained model: a SavedModel, four TFLite variants, a parity report, a model card.

    python export.py --model=runs/swift_srgan_x4 --output=saved_models/swift_srgan_x4
    python export.py --model=runs/ct/generator.keras --output=saved_models/ct --data=tfrecords/ct
    python export.py --model=runs/swift_srgan_x4 --variants=float32,float16

--model takes a run folder or a .keras file. The int8 model is calibrated on LR patches
of the run's training records (--data to use others). Writes saved_model/,
model_{float32,float16,dynamic_int8,int8}.tflite, export_report.json and model_card.json
into --output (default saved_models/<model name>); see sr_tf/export/. Data-consistency
projection after the model is baked into every graph (--consistency=project, the
default; --consistency=none for the model alone).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from sr_tf import consistency  # noqa: E402  (no TensorFlow import: the defaults only)
from sr_tf.data import presets  # noqa: E402  (no TensorFlow import: the names only)

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Run folder, .keras file or zoo name (python zoo.py lists them) to export.", required=True)
flags.DEFINE_string("output", None, "Export folder; default saved_models/exports/<model name>. An existing folder is "
                    "replaced only if it is a previous export.")
flags.DEFINE_string("data", None, "data_prep folder for int8 calibration and parity images; default: the run's "
                    "training data.")
flags.DEFINE_list("variants", None, "TFLite variants to build (float32, float16, dynamic_int8, int8); default all.")
flags.DEFINE_integer("calibration_samples", 100, "LR training patches that calibrate the int8 model.")
flags.DEFINE_enum("degradation", None, list(presets.PRESETS), "Degradation; default: the one the model trained with.")
flags.DEFINE_integer("seed", 0, "Seed of the calibration patches and parity images.")
consistency.define_flags("project: bake data-consistency projection after the model into the SavedModel and TFLite "
                         "graphs; none: export the model alone.")
flags.adopt_module_key_flags(consistency)  # --help lists them as this script's flags


def _summary(report):
    lines = [f"{'form':14s} {'size':>10s} {'PSNR vs Keras':>14s} {'target':>7s}  ok"]
    for variant, entry in report["variants"].items():
        if entry["status"] != "ok":
            lines.append(f"{variant:14s} not built: {entry['error'].splitlines()[0][:200]}")
            continue
        value = "identical" if entry["psnr_db"] is None else f"{entry['psnr_db']:.1f} dB"
        lines.append(f"{variant:14s} {entry['bytes'] / 1e6:8.2f} MB {value:>14s} {entry['target_db']:5.0f} dB"
                     f"  {'yes' if entry['meets_target'] else 'NO'}")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from sr_tf import zoo

    try:  # before the seconds of importing TensorFlow
        consistency.check(FLAGS.consistency, FLAGS.consistency_iterations, FLAGS.consistency_step)
        model = zoo.resolve(FLAGS.model)
    except (zoo.ZooError, consistency.ConsistencyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not os.path.exists(model):
        print(f"error: {FLAGS.model}: no such model file or folder", file=sys.stderr)
        return 1
    from sr_tf import export

    name = os.path.basename(os.path.normpath(model))
    if name == "generator.keras":
        name = os.path.basename(os.path.dirname(os.path.abspath(model)))
    # Beside the zoo, never in it: saved_models/<name> is a zoo model's folder.
    output = FLAGS.output or os.path.join("saved_models", "exports", os.path.splitext(name)[0])
    try:
        report = export.export(model, output, data=FLAGS.data, variants=FLAGS.variants or export.VARIANTS,
                               calibration_samples=FLAGS.calibration_samples, degradation=FLAGS.degradation,
                               seed=FLAGS.seed, progress=lambda line: print(line, flush=True),
                               consistency=FLAGS.consistency, consistency_iterations=FLAGS.consistency_iterations,
                               consistency_step=FLAGS.consistency_step)
    except (ValueError, OSError) as exc:  # ExportError, model load errors, unreadable records
        logging.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if "note" in report["parity"]:
        print(f"note: {report['parity']['note']}")
    print(_summary(report))
    print(f"export in {output}")
    return 0


if __name__ == "__main__":
    app.run(main)
