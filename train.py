"""Train a super-resolution model with the one distributed loop.

    python train.py --model=swift_srgan                      # embedded sample set, short schedule
    python train.py --model=srgan --data=tfrecords/cxr --scale=4 --steps=100000 --pretrain_steps=20000
    python train.py --flagfile=runs/NAME/flags.txt --resume  # continue a run

With no --data, the embedded sample set is converted once into tfrecords/samples.
Several machines: set TF_CONFIG on each and pass --strategy=multi_worker (or auto).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from sr_tf import models  # noqa: E402
from sr_tf.training import loop  # noqa: E402

FLAGS = flags.FLAGS
SAMPLES_DIR = os.path.join("tfrecords", "samples")

# The sample-set short schedule: about 10 minutes on a 2-core CPU. Ten minutes leave no
# room for a useful adversarial phase, so it is all pixel loss (a GAN phase needs a
# PSNR-trained generator first: --init_from). The generator starts from bicubic
# (residual form), so every step can only add what the data supports.
SAMPLE_STEPS = 1200
SAMPLE_LEARNING_RATE = 1e-3
# The short schedule promises at most 10 minutes: the loop stops at 9 whatever the
# machine (building the sample set and tracing come on top, well under a minute).
SAMPLE_MAX_MINUTES = 9.0

# Every flag is a TrainConfig field with the field's default, but these: their default
# depends on other flags (no --data means the sample set and, without --steps, its short
# schedule), so they default to None and config_from_flags works them out. Each says what
# None stands for, in --help.
RESOLVED = {
    "data": f"the embedded sample set, converted once into {SAMPLES_DIR}",
    "run_dir": "runs/<model>_x<scale>",
    "steps": f"{SAMPLE_STEPS} on the sample set (its short schedule), {loop.TrainConfig.steps} otherwise",
    "max_minutes": f"{SAMPLE_MAX_MINUTES:g} on the sample-set short schedule, none otherwise",
    "pretrain_steps": "for GANs all of --steps on the sample-set short schedule, 0 with --init_from, a fifth of "
                      "--steps otherwise; 0 for the other models",
    "learning_rate": f"{SAMPLE_LEARNING_RATE:g} on the sample-set short schedule, "
                     f"{loop.TrainConfig.learning_rate:g} otherwise",
    "warmup_steps": "5% of --steps with --lr_schedule=cosine, else 0",
}
loop.TrainConfig.define_flags(FLAGS, resolved=RESOLVED)
flags.adopt_module_key_flags(loop)  # --help lists them as this script's flags


def short_schedule():
    """True for the sample-set short schedule: no --data and no --steps."""
    return FLAGS.data is None and FLAGS.steps is None


def ensure_samples():
    """Build the embedded sample set once."""
    from sr_tf import records, zoo

    if not os.path.isfile(os.path.join(SAMPLES_DIR, records.MANIFEST_NAME)):
        print(f"building the embedded sample set in {SAMPLES_DIR} ...", flush=True)
    zoo.sample_records(SAMPLES_DIR, progress=FLAGS.progress)


def config_from_flags():
    """The TrainConfig of the flags, the RESOLVED ones left at None worked out here."""
    short = short_schedule()
    steps = FLAGS.steps if FLAGS.steps is not None else SAMPLE_STEPS if short else loop.TrainConfig.steps
    if models.is_gan(FLAGS.model):
        pretrain = steps if short else (0 if FLAGS.init_from else steps // 5)
    else:
        pretrain = 0
    resolved = {
        "data": SAMPLES_DIR,
        "run_dir": os.path.join("runs", f"{FLAGS.model}_x{FLAGS.scale}"),
        "steps": steps,
        "pretrain_steps": pretrain,
        "warmup_steps": steps // 20 if FLAGS.lr_schedule == "cosine" else 0,
    }
    if short:  # otherwise TrainConfig's defaults
        resolved.update(learning_rate=SAMPLE_LEARNING_RATE, max_minutes=SAMPLE_MAX_MINUTES)
    return loop.TrainConfig.from_flags(FLAGS, **resolved)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from sr_tf.records import RecordsError

    if FLAGS.data is None:
        ensure_samples()
    config = config_from_flags()
    pixel_only = models.is_gan(config.model) and config.pretrain_steps == config.steps
    try:
        result = loop.train(config, flags_text=FLAGS.flags_into_string())
    except (loop.TrainingError, RecordsError, ValueError) as exc:
        logging.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if short_schedule() and pixel_only:
        print("short schedule: pixel loss only (no adversarial phase in ten minutes); "
              "fine-tune adversarially with --init_from=<this run> --steps=N")
    if result["val"] is not None:
        val = result["val"]
        print(f"validation ({config.data}, x{config.scale}, {config.degradation}; {result['weights']} weights): "
              f"model PSNR {val['psnr']:.2f} dB SSIM {val['ssim']:.4f} | "
              f"bicubic PSNR {val['bicubic_psnr']:.2f} dB SSIM {val['bicubic_ssim']:.4f}")
    if result["finished"]:
        print(f"generator saved to {os.path.join(config.run_dir, 'generator.keras')}")
    return 0


if __name__ == "__main__":
    app.run(main)
