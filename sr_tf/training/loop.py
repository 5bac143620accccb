"""The one training loop, for the default, Mirrored and MultiWorkerMirrored strategies.

Keras 3 ``fit()`` fails under MultiWorkerMirroredStrategy (docs/DESIGN.md, contract 7:
the one training loop), so this loop drives ``strategy.run(trainer.train_step, ...)``
inside a ``tf.function`` for every strategy, with our own checkpoints
(``tf.train.CheckpointManager``: step, models, optimizers; the last K plus the best by
validation PSNR), TensorBoard summaries, a metrics CSV and a progress bar.

Run layout (``run_dir``)::

    config.json          the full training configuration (reproduce with it)
    flags.txt            the command-line flags, usable as --flagfile
    checkpoints/         last K checkpoints
    best/                the checkpoint with the best validation PSNR
    tensorboard/         scalars and LR | bicubic | SR | HR images of fixed validation samples
    metrics.csv          step, phase, metric, value
    generator.keras      the final generator (its averaged weights when they measure better)
    result.json          steps, wall time, the last validation of both weight sets, which was kept
"""

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import time

import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

# Swift-SRGAN's loss weights (pixel 1, adversarial 1e-3, perceptual 6e-3, TV 2e-8).
DEFAULT_PERCEPTUAL = {"srgan": "vgg19", "swift_srgan": "mobilenet_v2"}

# The names of the choices that are the loop's own (the others come from their registries:
# TrainConfig.choices).
DEGRADE_ON = ("auto", "pipeline", "device")
LR_SCHEDULES = ("constant", "cosine", "step")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def _setting(default, help_text):
    """A TrainConfig field and the help text of its flag (``TrainConfig.define_flags``)."""
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata={"help": help_text})
    return dataclasses.field(default=default, metadata={"help": help_text})


def _json_object(text):
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on; stored as ``config.json`` in the run directory.

    These are the training defaults: ``train.py``'s flags are made from the fields
    (:meth:`define_flags`) and give a configuration back (:meth:`from_flags`), so a
    library caller and the command line start from the same values.
    """

    model: str = _setting("swift_srgan", "Model family.")
    scale: int = _setting(4, "Upscaling factor.")
    data: str = _setting("tfrecords/samples", "data_prep output folder.")
    run_dir: str = _setting("runs/swift_srgan_x4", "Run folder.")
    steps: int = _setting(10000, "Total training steps.")
    max_minutes: float = _setting(0.0, "Time budget of the training loop in minutes: it stops early, evaluated "
                                       "and saved (0: none).")
    pretrain_steps: int = _setting(0, "Pixel-loss generator steps before the adversarial phase (GANs).")
    batch_size: int = _setting(16, "Global batch size (split across replicas).")
    patch_size: int = _setting(96, "HR patch size.")
    degradation: str = _setting("bicubic", "Degradation preset.")
    degrade_on: str = _setting("auto", "Where LR inputs are made (auto: inside the train step when a GPU is "
                                       "present).")
    pixel_loss: str = _setting("l1", "Pixel loss (L1: sharper than MSE and the PSNR-oriented SR default).")
    pixel_weight: float = _setting(1.0, "Pixel loss weight.")
    adversarial_weight: float = _setting(1e-3, "Adversarial loss weight.")
    relativistic: bool = _setting(False, "Relativistic average adversarial loss.")
    perceptual: str = _setting("auto", "Perceptual loss backbone (auto: VGG19 for srgan, MobileNetV2 for "
                                       "swift_srgan, none otherwise).")
    perceptual_weight: float = _setting(6e-3, "Perceptual loss weight.")
    perceptual_weights: str = _setting("imagenet", "imagenet (from the Keras cache; random frozen backbone when "
                                                   "absent), a .h5 path, or random.")
    tv_weight: float = _setting(2e-8, "Total variation weight.")
    ssim_weight: float = _setting(0.0, "SSIM loss weight.")
    learning_rate: float = _setting(2e-4, "Generator learning rate.")
    d_learning_rate: float = _setting(1e-4, "Discriminator learning rate.")
    lr_schedule: str = _setting("cosine", "Learning-rate schedule.")
    warmup_steps: int = _setting(0, "Linear warm-up steps from 0 to the learning rate (cosine schedule).")
    ema_decay: float = _setting(0.999, "Decay of the generator's exponential weight average, evaluated beside the "
                                       "trained weights; the better of the two is saved (0: no average).")
    augment: bool = _setting(True, "Intensity, smoothness and input-noise augmentation of training patches "
                                   "(sr_tf.data.augment).")
    init_from: str = _setting("", "Start from the weights of this generator (.keras, run folder or zoo name), "
                                  "e.g. a PSNR-trained model before adversarial fine-tuning.")
    verify_shards: bool = _setting(True, "Check every shard's SHA-256 against the manifest before training "
                                         "(sizes are always checked); false skips the hashing for very large data.")
    precision: str = _setting("float32", "Compute precision: float32; mixed_float16 (GPUs, with loss scaling); "
                                         "mixed_bfloat16 (GPUs, and CPUs with AVX-512 BF16 or AMX instructions, "
                                         "where it makes the convolutions of a step faster). Variables, losses and "
                                         "model outputs stay float32, and the saved generator computes in float32.")
    mixed_precision: bool = _setting(False, "Shorthand for --precision=mixed_float16.")
    strategy: str = _setting("auto", "Distribution strategy (auto: multi_worker when TF_CONFIG names several "
                                     "workers, mirrored with several GPUs, else default).")
    seed: int = _setting(0, "Random seed.")
    resume: bool = _setting(False, "Continue from the run folder's last checkpoint.")
    checkpoint_every: int = _setting(200, "Checkpoint interval in steps.")
    keep_checkpoints: int = _setting(3, "How many recent checkpoints to keep.")
    eval_every: int = _setting(200, "Validation interval in steps.")
    log_every: int = _setting(10, "Logging interval in steps.")
    eval_max_images: int = _setting(16, "Validation images evaluated at each validation.")
    grid_images: int = _setting(4, "Validation images shown as LR | bicubic | SR | HR in TensorBoard.")
    model_options: dict = _setting({}, "JSON of model constructor options, e.g. '{\"num_blocks\": 8}'.")
    discriminator_options: dict = _setting({}, "JSON of discriminator options, e.g. '{\"filters\": 32}'.")
    progress: bool = _setting(True, "Show a progress bar.")

    @staticmethod
    def choices():
        """The allowed values of the fields that name something, from the registries that
        define them, read at each call: what ``check`` accepts and the flags offer."""
        from sr_tf import losses, models
        from sr_tf.data import degrade

        return {
            "model": models.NAMES,
            "scale": degrade.SCALES,
            "degradation": degrade.PRESETS,
            "degrade_on": DEGRADE_ON,
            "pixel_loss": losses.PixelLoss.KINDS,
            "perceptual": ("auto", "none", *losses.BACKBONES),
            "lr_schedule": LR_SCHEDULES,
            "strategy": STRATEGIES,
            "precision": PRECISIONS,
        }

    @classmethod
    def define_flags(cls, flag_values=None, resolved=None):
        """Define one absl flag per field, named as the field, with its default and its
        help text; the fields of :meth:`choices` are enum flags of their names, the dict
        fields JSON strings that must hold an object.

        ``resolved`` maps fields whose default the front end works out itself to what
        that default is: their flags default to None (:meth:`from_flags` then takes the
        front end's value) and their help says what None stands for.
        """
        from absl import flags

        flag_values = flags.FLAGS if flag_values is None else flag_values
        resolved = resolved or {}
        choices = cls.choices()
        for field in dataclasses.fields(cls):
            name, help_text = field.name, field.metadata["help"]
            default = field.default_factory() if field.type is dict else field.default
            if name in resolved:
                default, help_text = None, f"{help_text} Default: {resolved[name]}."
            if name in choices:
                flags.DEFINE_enum(name, None if default is None else str(default), [str(c) for c in choices[name]],
                                  help_text, flag_values=flag_values)
            elif field.type is dict:
                flags.DEFINE_string(name, json.dumps(default), help_text, flag_values=flag_values)
                flags.register_validator(name, _json_object, f"--{name} must be a JSON object",
                                         flag_values=flag_values)
            else:
                define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
                          str: flags.DEFINE_string}[field.type]
                define(name, default, help_text, flag_values=flag_values)

    @classmethod
    def from_flags(cls, flag_values=None, **defaults):
        """The configuration that flags defined by :meth:`define_flags` give: each field
        is its flag's value in the field's type (an enum's name converted, JSON decoded);
        a flag left at None takes ``defaults[name]``, else the field's own default."""
        from absl import flags

        flag_values = flags.FLAGS if flag_values is None else flag_values
        values = {}
        for field in dataclasses.fields(cls):
            value = flag_values[field.name].value
            if value is not None:
                values[field.name] = json.loads(value) if field.type is dict else field.type(value)
            elif field.name in defaults:
                values[field.name] = defaults[field.name]
        return cls(**values)

    def check(self):
        from sr_tf import models

        for name, allowed in self.choices().items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(map(str, allowed))}, "
                                 f"got {getattr(self, name)!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("--steps and --batch_size must be positive")
        if not 0 <= self.pretrain_steps <= self.steps:
            raise ValueError("--pretrain_steps must be between 0 and --steps")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError("--warmup_steps must be at least 0 and less than --steps")
        if self.warmup_steps and self.lr_schedule != "cosine":
            raise ValueError("--warmup_steps needs --lr_schedule=cosine")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema_decay must be in [0, 1), got {self.ema_decay}")
        if models.is_gan(self.model) and self.pretrain_steps < self.steps and not (self.pretrain_steps or self.init_from):
            raise ValueError(
                "the adversarial phase starts only from a PSNR-trained generator: give --pretrain_steps "
                "or --init_from (a pixel-loss trained generator)"
            )
        if self.max_minutes < 0:
            raise ValueError(f"--max_minutes must be 0 (no budget) or positive, got {self.max_minutes}")
        if self.mixed_precision and self.precision not in ("float32", "mixed_float16"):
            raise ValueError(f"--mixed_precision means --precision=mixed_float16, not --precision={self.precision}; "
                             "give one of them")

    def policy(self):
        """The Keras dtype policy the run computes under (``precision``, or
        ``mixed_float16`` for ``mixed_precision``)."""
        return "mixed_float16" if self.mixed_precision else self.precision


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, bad configuration); says why."""


# ----------------------------------------------------------------------------- strategy


def make_strategy(name):
    """``auto`` picks multi_worker when TF_CONFIG names several workers, mirrored with
    several GPUs, and the default strategy otherwise."""
    if name == "auto":
        tf_config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
        if len(tf_config.get("cluster", {}).get("worker", [])) > 1:
            name = "multi_worker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")


def _task_info(strategy):
    """(is_chief, worker_index) from the cluster resolver, (True, 0) on one machine."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True, 0
    task_type, task_id = resolver.task_type, resolver.task_id or 0
    is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0
                                        and "chief" not in resolver.cluster_spec().as_dict())
    return is_chief, task_id


# ----------------------------------------------------------------------------- building


def _schedule(config, base_rate):
    import keras

    if config.lr_schedule == "cosine":
        if config.warmup_steps:
            return keras.optimizers.schedules.CosineDecay(
                0.0, decay_steps=config.steps - config.warmup_steps, alpha=0.01,
                warmup_target=base_rate, warmup_steps=config.warmup_steps,
            )
        return keras.optimizers.schedules.CosineDecay(base_rate, decay_steps=config.steps, alpha=0.01)
    if config.lr_schedule == "step":
        boundaries = [int(config.steps * 0.5), int(config.steps * 0.75)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, [base_rate, base_rate / 2, base_rate / 4])
    return base_rate


def _optimizer(config, base_rate):
    import keras

    optimizer = keras.optimizers.Adam(_schedule(config, base_rate), beta_1=0.9, beta_2=0.999)
    if config.policy() == "mixed_float16":  # bfloat16 has float32's exponent range: no loss scaling
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _perceptual(config):
    from sr_tf import losses

    backbone = DEFAULT_PERCEPTUAL.get(config.model) if config.perceptual == "auto" else config.perceptual
    if not backbone or backbone == "none" or config.perceptual_weight == 0:
        return None
    weights = None if config.perceptual_weights == "random" else config.perceptual_weights
    return losses.PerceptualLoss(backbone=backbone, weights=weights, weight=config.perceptual_weight)


def build(config, strategy):
    """Generator, discriminator, losses, optimizers and trainers, under ``strategy.scope()``.

    Returns a dict with ``generator``, ``discriminator`` (or None), ``supervised``
    (trainer for pixel-loss steps) and ``gan`` (trainer for adversarial steps, or None).
    """
    import keras

    from sr_tf import losses, models
    from sr_tf.data import degrade
    from sr_tf.training.trainers import GANTrainer, SupervisedTrainer, WeightAverage

    model_scale = degrade.model_scale(config.degradation, config.scale)
    on_device = _degrade_on_device(config)
    with strategy.scope():
        keras.utils.set_random_seed(config.seed)
        generator = models.build(config.model, scale=model_scale, **config.model_options)
        if config.init_from:
            _initialise(generator, config.init_from)
        average = WeightAverage(generator.trainable_variables, config.ema_decay) if config.ema_decay else None
        gan_model = models.is_gan(config.model)
        perceptual = _perceptual(config)
        common = dict(
            pixel_loss=losses.PixelLoss(config.pixel_loss, weight=config.pixel_weight),
            global_batch_size=config.batch_size,
            ssim_loss=losses.SSIMLoss(weight=config.ssim_weight) if config.ssim_weight else None,
            tv_loss=losses.TotalVariationLoss(weight=config.tv_weight) if config.tv_weight else None,
            degradation=config.degradation if on_device else None,
            scale=config.scale,
            seed=config.seed,
            weight_average=average,
            augment=config.augment,
        )
        g_optimizer = _optimizer(config, config.learning_rate)
        # A GAN's pre-training is PSNR-first: its perceptual loss joins in the adversarial
        # phase only. Other models train with every loss they are given.
        supervised = SupervisedTrainer(generator, perceptual_loss=None if gan_model else perceptual, **common)
        supervised.compile(g_optimizer)
        discriminator = gan = None
        if gan_model:
            discriminator = models.build_discriminator(config.model, **config.discriminator_options)
            gan = GANTrainer(
                generator, discriminator,
                losses.AdversarialLoss(relativistic=config.relativistic, weight=config.adversarial_weight),
                perceptual_loss=perceptual, **common,
            )
            gan.compile(g_optimizer, _optimizer(config, config.d_learning_rate))
        # Build every variable now, so a checkpoint restores into existing variables.
        lr_side = config.patch_size // config.scale if model_scale != 1 else config.patch_size
        generator(tf.zeros([1, lr_side, lr_side, 1]))
        g_optimizer.build(generator.trainable_variables)
        if discriminator is not None:
            discriminator(tf.zeros([1, config.patch_size, config.patch_size, 1]))
            gan.d_optimizer.build(discriminator.trainable_variables)
    return {"generator": generator, "discriminator": discriminator, "supervised": supervised, "gan": gan,
            "average": average}


def _initialise(generator, source):
    """Copy the weights of the generator at ``source`` (a ``.keras`` file, a run folder or
    a zoo name) into ``generator``; TrainingError when it cannot be read or differs."""
    import keras

    from sr_tf import zoo

    try:
        path = zoo.keras_path(source)
        trained = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # a missing name, a truncated zip, a foreign file: whatever the loader raises
        raise TrainingError(f"--init_from {source}: cannot load it ({type(exc).__name__}: {exc})") from exc
    mine = [tuple(w.shape) for w in generator.weights]
    theirs = [tuple(w.shape) for w in trained.weights]

    def function(model):  # what the model computes: its config but for its name
        return {k: v for k, v in model.get_config().items() if k not in ("name", "trainable", "dtype")}

    if type(trained) is not type(generator) or mine != theirs or function(trained) != function(generator):
        raise TrainingError(
            f"--init_from {source}: {type(trained).__name__} with {len(theirs)} weights does not match "
            f"this run's {type(generator).__name__} ({len(mine)} weights) or is built with other options "
            f"({function(trained)} against {function(generator)}); same model, scale and options needed"
        )
    generator.set_weights(trained.get_weights())


def _degrade_on_device(config):
    if config.degrade_on == "auto":
        return bool(tf.config.list_logical_devices("GPU"))
    return config.degrade_on == "device"


# ----------------------------------------------------------------------------- data


def datasets(config, strategy):
    from sr_tf.data import pipeline

    on_device = _degrade_on_device(config)

    def train_fn(input_context):
        return pipeline.make_dataset(
            config.data, "train", config.scale, config.patch_size, config.batch_size,
            degradation=config.degradation, seed=config.seed, hr_only=on_device, input_context=input_context,
            augment=config.augment, verify_checksums=config.verify_shards,
        )

    train = strategy.distribute_datasets_from_function(train_fn)
    val = pipeline.make_dataset(
        config.data, "val", config.scale, None, 1, degradation=config.degradation, seed=config.seed,
        verify_checksums=config.verify_shards,
    ).take(config.eval_max_images)
    return train, val


# ----------------------------------------------------------------------------- the loop


def distributed_step(strategy, trainer, jit_compile=False):
    """The loop's training step (docs/DESIGN.md, contract 7 (the one training loop)):
    ``strategy.run(trainer.train_step)`` on a distributed batch inside a ``tf.function``,
    each returned value summed over the replicas with ``strategy.reduce(SUM)``. Returns
    the step, ``batch -> {name: tensor}``; ``jit_compile`` compiles it with XLA
    (``bench.train_step`` measures that; the loop does not)."""

    @tf.function(jit_compile=jit_compile)
    def step(batch):
        per_replica = strategy.run(trainer.train_step, args=(batch,))
        return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in per_replica.items()}

    return step


class _Stop:
    """Turns SIGINT/SIGTERM into a request to checkpoint and stop after this step."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        del frame
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _write_config(config, run_dir, flags_text=None):
    os.makedirs(run_dir, exist_ok=True)
    from sr_tf.io import files

    files.write_json_atomic(os.path.join(run_dir, "config.json"), dataclasses.asdict(config))
    if flags_text:
        files.write_bytes_atomic(os.path.join(run_dir, "flags.txt"), flags_text.encode("utf-8"))


# What a checkpoint's state depends on: a resumed run must agree on these.
RESUME_FIELDS = ("model", "scale", "degradation", "model_options", "ema_decay", "batch_size")


def _check_resumable(config):
    """TrainingError when ``--resume`` would continue the run in ``config.run_dir`` with
    another model, options or weight average than it was started with, or across loss
    scaling (mixed_float16's optimizer checkpoints another state than float32's and
    mixed_bfloat16's, which can continue each other). A run of an older version lacks the
    newer fields: their old defaults stand for them."""
    path = os.path.join(config.run_dir, "config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        started = {**dataclasses.asdict(TrainConfig()), "ema_decay": 0.0, **json.load(f)}
    differ = [f"--{name}: the run has {started[name]!r}, this command {getattr(config, name)!r}"
              for name in RESUME_FIELDS if started.get(name) != getattr(config, name)]
    before = TrainConfig(precision=started["precision"], mixed_precision=started["mixed_precision"]).policy()
    if (before == "mixed_float16") != (config.policy() == "mixed_float16"):
        differ.append(f"--precision: the run trained in {before}, this command {config.policy()} (loss scaling "
                      "only in mixed_float16)")
    if differ:
        raise TrainingError(f"cannot resume {config.run_dir} with other settings ({'; '.join(differ)}); "
                            f"resume with its own: --flagfile={os.path.join(config.run_dir, 'flags.txt')} --resume")


def _learning_rate(optimizer):
    rate = optimizer.learning_rate
    return float(rate.numpy() if hasattr(rate, "numpy") else rate)


class _Recorder:
    """TensorBoard scalars/images and the metrics CSV (chief only)."""

    def __init__(self, run_dir, enabled):
        self.enabled = enabled
        if enabled:
            self.writer = tf.summary.create_file_writer(os.path.join(run_dir, "tensorboard"))
            path = os.path.join(run_dir, "metrics.csv")
            new = not os.path.exists(path)
            self._csv_file = open(path, "a", newline="", encoding="utf-8")
            self._csv = csv.writer(self._csv_file)
            if new:
                self._csv.writerow(["step", "phase", "metric", "value"])

    def scalars(self, step, phase, values):
        if not self.enabled:
            return
        with self.writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(f"{phase}/{name}", value)
                self._csv.writerow([step, phase, name, f"{value:.6g}"])
        self._csv_file.flush()

    def images(self, step, name, grid):
        if self.enabled:
            with self.writer.as_default(step=step):
                tf.summary.image(name, grid, step=step, max_outputs=grid.shape[0])

    def close(self):
        if self.enabled:
            self.writer.flush()
            self._csv_file.close()


def evaluate(generator, val, scale, degradation_scale_one=False):
    """Mean PSNR/SSIM of the model and of bicubic over the validation batches."""
    from sr_tf import metrics

    totals = {}
    for lr, hr in val:
        sr = tf.clip_by_value(tf.cast(generator(lr, training=False), tf.float32), 0.0, 1.0)
        baseline = lr if degradation_scale_one else metrics.upsample(lr, tf.shape(hr)[1:3])
        for prefix, image in (("", sr), ("bicubic_", baseline)):
            for name, fn in (("psnr", metrics.psnr), ("ssim", metrics.ssim)):
                value = fn(hr, image, border=scale)
                if name == "psnr":
                    value = tf.minimum(value, 100.0)
                totals.setdefault(prefix + name, []).extend(value.numpy().tolist())
    if not totals:
        raise TrainingError("the validation split yielded no images")
    return {name: float(np.mean(values)) for name, values in totals.items()}


def _image_rows(generator, samples):
    """One image [LR upsampled (nearest) | bicubic | SR | HR] per fixed validation sample;
    each its own image (validation images differ in size)."""
    from sr_tf import metrics

    rows = []
    for lr, hr in samples:
        size = tf.shape(hr)[1:3]
        sr = tf.clip_by_value(tf.cast(generator(lr, training=False), tf.float32), 0.0, 1.0)
        row = [metrics.upsample(lr, size, "nearest"), metrics.upsample(lr, size, "bicubic"), sr, hr]
        rows.append(tf.concat(row, axis=2))
    return rows


def train(config, flags_text=None, strategy=None):
    """Run (or resume) a training run. Returns the built objects (generator, trainers...).

    Raises :class:`TrainingError` on a non-finite loss, after logging which step and
    which checkpoint is the last good one; nothing is saved from the bad step.
    """
    config.check()
    with global_policy(config.policy()):
        return _train(config, flags_text, strategy)


@contextlib.contextmanager
def global_policy(name):
    """Keras' global dtype policy set to ``name`` while the block runs (the models,
    losses and optimizers of a run are made under it), and put back after."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def float32_copy(model):
    """``model`` itself when it computes in float32, else a copy of it with its weights
    that does: what a run saves, since a mixed-precision generator deploys in float32
    (export and the CPU kernels of inference; bfloat16 without the CPU's BF16
    instructions is emulated and slow)."""
    from sr_tf import models

    return model if model.compute_dtype == "float32" else models.copy(model, "float32")


def _train(config, flags_text, strategy):
    """:func:`train` under the run's dtype policy."""
    from sr_tf import zoo
    from sr_tf.data import degrade

    strategy = strategy or make_strategy(config.strategy)  # first: a multi-worker strategy needs a fresh runtime
    if config.policy() == "mixed_bfloat16":
        machine = zoo.machine()
        if not machine["gpus"] and not {"avx512_bf16", "amx_tile"} & set(machine["vector_extensions"]):
            log.warning("--precision=mixed_bfloat16 on a CPU without BF16 instructions (avx512_bf16, AMX) and no "
                        "GPU: its bfloat16 arithmetic is emulated and likely slower than float32")
    if config.max_minutes and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # Each worker would read its own clock and stop at a different step: a deadlock.
        raise TrainingError("--max_minutes cannot be used with several workers; set --steps instead")
    is_chief, worker = _task_info(strategy)
    run_dir = config.run_dir
    if config.resume:
        _check_resumable(config)
    if is_chief:
        _write_config(config, run_dir, flags_text)
    built = build(config, strategy)
    generator, supervised, gan = built["generator"], built["supervised"], built["gan"]
    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    best_psnr = tf.Variable(-np.inf, dtype=tf.float64, trainable=False, name="best_psnr")
    tracked = {"step": step, "best_psnr": best_psnr, "generator": generator, "g_optimizer": supervised.g_optimizer}
    if gan is not None:
        tracked.update(discriminator=built["discriminator"], d_optimizer=gan.d_optimizer)
    average = built["average"]
    if average is not None:
        tracked["generator_average"] = average
    checkpoint = tf.train.Checkpoint(**tracked)
    # Non-chief workers write to a scratch folder (their saves take part in collectives).
    ckpt_root = run_dir if is_chief else os.path.join(run_dir, f".worker-{worker}")
    manager = tf.train.CheckpointManager(checkpoint, os.path.join(ckpt_root, "checkpoints"), config.keep_checkpoints)
    best_manager = tf.train.CheckpointManager(checkpoint, os.path.join(ckpt_root, "best"), 1)
    if config.resume and manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        log.info("resumed from %s at step %d", manager.latest_checkpoint, int(step.numpy()))
        print(f"resumed from step {int(step.numpy())} ({manager.latest_checkpoint})", flush=True)
    elif manager.latest_checkpoint and not config.resume:
        raise TrainingError(
            f"{run_dir} already holds checkpoints; pass --resume to continue it or choose another --run_dir"
        )

    train_data, val = datasets(config, strategy)
    iterator = iter(train_data)
    steps = {}

    if config.pretrain_steps or gan is None:
        steps["pretrain" if gan is not None else "train"] = distributed_step(strategy, supervised)
    if gan is not None:
        steps["adversarial"] = distributed_step(strategy, gan)

    same_size = degrade.model_scale(config.degradation, config.scale) == 1
    grid_samples = list(val.take(config.grid_images))
    recorder = _Recorder(run_dir, is_chief)
    start = int(step.numpy())
    last_saved = manager.latest_checkpoint
    from tqdm import tqdm

    bar = tqdm(total=config.steps, initial=start, desc=f"train {config.model}", unit="step",
               disable=not (config.progress and is_chief), dynamic_ncols=True)
    started = time.perf_counter()
    result = averaged = None
    timed_out = False
    try:
        with _Stop() as stop:
            while int(step.numpy()) < config.steps:
                current = int(step.numpy())
                phase = "pretrain" if gan is not None and current < config.pretrain_steps else (
                    "adversarial" if gan is not None else "train")
                values = {k: float(v) for k, v in steps[phase](next(iterator)).items()}
                if not all(math.isfinite(v) for v in values.values()):
                    bad = ", ".join(f"{k}={v}" for k, v in values.items() if not math.isfinite(v))
                    raise TrainingError(
                        f"non-finite loss at step {current + 1} ({bad}); stopped without saving. "
                        f"Last good checkpoint: {last_saved or 'none'}"
                    )
                step.assign_add(1)
                done = current + 1
                bar.update(1)
                out_of_time = bool(config.max_minutes) and time.perf_counter() - started >= config.max_minutes * 60
                last = done == config.steps or out_of_time
                if done % config.log_every == 0 or last:
                    values["learning_rate"] = _learning_rate(supervised.g_optimizer)
                    values["patches_per_second"] = (done - start) * config.batch_size / (time.perf_counter() - started)
                    recorder.scalars(done, phase, values)
                    bar.set_postfix(loss=f"{values['loss']:.4g}")
                if done % config.eval_every == 0 or last:
                    result = evaluate(generator, val, config.scale, same_size)
                    recorder.scalars(done, "val", result)
                    for index, row in enumerate(_image_rows(generator, grid_samples)):
                        recorder.images(done, f"val/lr_bicubic_sr_hr/{index}", row)
                    best = result["psnr"]
                    if average is not None:
                        with average.applied(generator.trainable_variables):
                            averaged = evaluate(generator, val, config.scale, same_size)
                        recorder.scalars(done, "val_average", averaged)
                        best = max(best, averaged["psnr"])
                    if best > best_psnr.numpy():
                        best_psnr.assign(best)
                        best_manager.save(checkpoint_number=done)
                if done % config.checkpoint_every == 0 or last:
                    last_saved = manager.save(checkpoint_number=done)
                if out_of_time and done < config.steps:
                    timed_out = True
                    print(f"\ntime budget of {config.max_minutes:g} min reached at step {done} of {config.steps}; "
                          f"checkpoint {last_saved} (continue with --resume)", flush=True)
                    break
                if stop.signal:
                    last_saved = manager.save(checkpoint_number=done)
                    print(f"\n{stop.signal}: checkpoint saved at step {done} ({last_saved}); "
                          "continue with --resume", flush=True)
                    break
    finally:
        bar.close()
        recorder.close()
    finished = int(step.numpy()) >= config.steps or timed_out
    # averaged is only measured when there is an average.
    kept = "average" if averaged and result and averaged["psnr"] > result["psnr"] else "trained"
    if finished and is_chief:
        weights = average.applied(generator.trainable_variables) if kept == "average" else contextlib.nullcontext()
        from sr_tf.io import files

        with weights, files.atomic_path(os.path.join(run_dir, "generator.keras")) as temporary:
            float32_copy(generator).save(temporary)  # a reader never sees a half-written model
        files.write_json_atomic(os.path.join(run_dir, "result.json"), {
            "step": int(step.numpy()), "timed_out": timed_out,
            "train_seconds": round(time.perf_counter() - started, 1),
            "weights": kept, "val": averaged if kept == "average" else result,
            "val_trained": result, "val_average": averaged,
        })
    if not is_chief:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    built.update(step=int(step.numpy()), val=averaged if kept == "average" else result, val_trained=result,
                 val_average=averaged, weights=kept, finished=finished, timed_out=timed_out, strategy=strategy)
    return built
