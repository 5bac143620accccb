"""Train a super-resolution model with the one distributed loop.

    python train.py --model=swift_srgan                      # embedded sample set, short schedule
    python train.py --model=srgan --data=tfrecords/cxr --scale=4 --steps=100000 --pretrain_steps=20000
    python train.py --flagfile=runs/NAME/flags.txt --resume  # continue a run

With no --data, the embedded sample set is converted once into tfrecords/samples.
Several machines: set TF_CONFIG on each and pass --strategy=multi_worker (or auto).
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
SAMPLES_DIR = os.path.join("tfrecords", "samples")

flags.DEFINE_enum("model", "swift_srgan", ["srgan", "swift_srgan", "vq_autoencoder", "residual_cnn"], "Model family.")
flags.DEFINE_enum("scale", "4", ["2", "4", "8"], "Upscaling factor.")
flags.DEFINE_string("data", None, "data_prep output folder; default: the embedded sample set.")
flags.DEFINE_string("run_dir", None, "Run folder; default runs/<model>_x<scale>.")
flags.DEFINE_integer("steps", None, "Total training steps (default: a short schedule on the sample set, "
                     "10000 otherwise).")
flags.DEFINE_float("max_minutes", None, "Time budget of the training loop in minutes: it stops early, "
                   "evaluated and saved (default: none; 9 on the sample-set short schedule).")
flags.DEFINE_integer("pretrain_steps", None, "Pixel-loss generator steps before the adversarial phase "
                     "(GANs; default a fifth of --steps).")
flags.DEFINE_integer("batch_size", 16, "Global batch size (split across replicas).")
flags.DEFINE_integer("patch_size", 96, "HR patch size.")
flags.DEFINE_enum("degradation", "bicubic", ["bicubic", "blur_downsample", "noisy", "bilinear_artifacts",
                                             "self_supervised"], "Degradation preset.")
flags.DEFINE_enum("degrade_on", "auto", ["auto", "pipeline", "device"], "Where LR inputs are made "
                  "(auto: inside the train step when a GPU is present).")
flags.DEFINE_enum("pixel_loss", "l1", ["mse", "l1", "charbonnier"], "Pixel loss (L1: sharper than MSE and "
                  "the PSNR-oriented SR default).")
flags.DEFINE_float("pixel_weight", 1.0, "Pixel loss weight.")
flags.DEFINE_float("adversarial_weight", 1e-3, "Adversarial loss weight.")
flags.DEFINE_bool("relativistic", False, "Relativistic average adversarial loss.")
flags.DEFINE_enum("perceptual", "auto", ["auto", "none", "vgg19", "mobilenet_v2"], "Perceptual loss backbone "
                  "(auto: VGG19 for srgan, MobileNetV2 for swift_srgan, none otherwise).")
flags.DEFINE_float("perceptual_weight", 6e-3, "Perceptual loss weight.")
flags.DEFINE_string("perceptual_weights", "imagenet", "imagenet (from the Keras cache; random frozen "
                    "backbone when absent), a .h5 path, or random.")
flags.DEFINE_float("tv_weight", 2e-8, "Total variation weight.")
flags.DEFINE_float("ssim_weight", 0.0, "SSIM loss weight.")
flags.DEFINE_float("learning_rate", None, "Generator learning rate (default 2e-4; 1e-3 on the sample-set "
                   "short schedule).")
flags.DEFINE_float("d_learning_rate", 1e-4, "Discriminator learning rate.")
flags.DEFINE_enum("lr_schedule", "cosine", ["constant", "cosine", "step"], "Learning-rate schedule.")
flags.DEFINE_integer("warmup_steps", None, "Linear warm-up steps of the cosine schedule (default: 5% of --steps).")
flags.DEFINE_float("ema_decay", 0.999, "Decay of the generator's exponential weight average, evaluated beside the "
                   "trained weights; the better of the two is saved (0: no average).")
flags.DEFINE_bool("augment", True, "Intensity, smoothness and input-noise augmentation of training patches.")
flags.DEFINE_string("init_from", None, "Start from the weights of this generator (.keras, run folder or zoo name), "
                    "e.g. a PSNR-trained model before adversarial fine-tuning.")
flags.DEFINE_bool("mixed_precision", False, "mixed_float16 compute (GPU).")
flags.DEFINE_enum("strategy", "auto", ["auto", "default", "mirrored", "multi_worker"], "Distribution strategy.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_bool("resume", False, "Continue from the run folder's last checkpoint.")
flags.DEFINE_integer("checkpoint_every", 200, "Checkpoint interval in steps.")
flags.DEFINE_integer("keep_checkpoints", 3, "How many recent checkpoints to keep.")
flags.DEFINE_integer("eval_every", 200, "Validation interval in steps.")
flags.DEFINE_integer("log_every", 10, "Logging interval in steps.")
flags.DEFINE_string("model_options", "{}", "JSON of model constructor options, e.g. '{\"num_blocks\": 8}'.")
flags.DEFINE_string("discriminator_options", "{}", "JSON of discriminator options, e.g. '{\"filters\": 32}'.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_bool("verify_shards", True, "Check every shard's SHA-256 against the manifest before training "
                  "(sizes are always checked); false skips the hashing for very large data.")

# The sample-set short schedule: about 10 minutes on a 2-core CPU. Ten minutes leave no
# room for a useful adversarial phase, so it is all pixel loss (a GAN phase needs a
# PSNR-trained generator first: --init_from). The generator starts from bicubic
# (residual form), so every step can only add what the data supports.
SAMPLE_STEPS = 1200
SAMPLE_LEARNING_RATE = 1e-3
# The short schedule promises at most 10 minutes: the loop stops at 9 whatever the
# machine (building the sample set and tracing come on top, well under a minute).
SAMPLE_MAX_MINUTES = 9.0


def ensure_samples():
    """Build the embedded sample set once."""
    from sr_tf import records, zoo

    if not os.path.isfile(os.path.join(SAMPLES_DIR, records.MANIFEST_NAME)):
        print(f"building the embedded sample set in {SAMPLES_DIR} ...", flush=True)
    zoo.sample_records(SAMPLES_DIR, progress=FLAGS.progress)


def config_from_flags():
    from sr_tf.training.loop import TrainConfig

    scale = int(FLAGS.scale)
    samples = FLAGS.data is None
    short = samples and FLAGS.steps is None  # the sample-set short schedule
    steps = FLAGS.steps or (SAMPLE_STEPS if samples else 10000)
    if FLAGS.pretrain_steps is not None:
        pretrain = FLAGS.pretrain_steps
    elif FLAGS.model in ("srgan", "swift_srgan"):
        pretrain = steps if short else (0 if FLAGS.init_from else steps // 5)
    else:
        pretrain = 0
    try:
        model_options = json.loads(FLAGS.model_options)
        discriminator_options = json.loads(FLAGS.discriminator_options)
    except json.JSONDecodeError as exc:
        raise app.UsageError(f"--model_options / --discriminator_options is not valid JSON: {exc}")
    return TrainConfig(
        model=FLAGS.model, scale=scale, data=FLAGS.data or SAMPLES_DIR,
        run_dir=FLAGS.run_dir or os.path.join("runs", f"{FLAGS.model}_x{scale}"),
        steps=steps, max_minutes=FLAGS.max_minutes if FLAGS.max_minutes is not None else (
            SAMPLE_MAX_MINUTES if short else 0.0),
        pretrain_steps=pretrain, batch_size=FLAGS.batch_size, patch_size=FLAGS.patch_size,
        degradation=FLAGS.degradation, degrade_on=FLAGS.degrade_on, pixel_loss=FLAGS.pixel_loss,
        pixel_weight=FLAGS.pixel_weight, adversarial_weight=FLAGS.adversarial_weight,
        relativistic=FLAGS.relativistic, perceptual=FLAGS.perceptual, perceptual_weight=FLAGS.perceptual_weight,
        perceptual_weights=FLAGS.perceptual_weights, tv_weight=FLAGS.tv_weight, ssim_weight=FLAGS.ssim_weight,
        learning_rate=FLAGS.learning_rate or (SAMPLE_LEARNING_RATE if short else 2e-4),
        d_learning_rate=FLAGS.d_learning_rate,
        lr_schedule=FLAGS.lr_schedule,
        warmup_steps=(FLAGS.warmup_steps if FLAGS.warmup_steps is not None else
                      (steps // 20 if FLAGS.lr_schedule == "cosine" else 0)),
        ema_decay=FLAGS.ema_decay, augment=FLAGS.augment, init_from=FLAGS.init_from or "",
        verify_shards=FLAGS.verify_shards,
        mixed_precision=FLAGS.mixed_precision, strategy=FLAGS.strategy, seed=FLAGS.seed, resume=FLAGS.resume,
        checkpoint_every=FLAGS.checkpoint_every, keep_checkpoints=FLAGS.keep_checkpoints,
        eval_every=FLAGS.eval_every, log_every=FLAGS.log_every, model_options=model_options,
        discriminator_options=discriminator_options, progress=FLAGS.progress,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from sr_tf.records import RecordsError
    from sr_tf.training import loop

    if FLAGS.data is None:
        ensure_samples()
    config = config_from_flags()
    short = FLAGS.data is None and FLAGS.steps is None
    pixel_only = config.model in ("srgan", "swift_srgan") and config.pretrain_steps == config.steps
    try:
        result = loop.train(config, flags_text=FLAGS.flags_into_string())
    except (loop.TrainingError, RecordsError, ValueError) as exc:
        logging.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if short and pixel_only:
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
