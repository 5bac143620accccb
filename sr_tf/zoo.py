"""The model zoo: trained models that ship in ``saved_models/<name>/``, and how each is made.

    model = sr_tf.models.pretrained("swift_srgan_x4")       # a Keras model
    predictor = sr_tf.inference.load_predictor("swift_srgan_x4")
    python upscale.py --model=residual_cnn_x2 --input=ct.dcm --output=out
    python zoo.py --build=swift_srgan_x4                     # reproduce one model
    python zoo.py --build=all                                # the whole zoo

A zoo folder holds ``generator.keras``, ``model_float16.tflite`` and ``model_card.json``
(the exact training command, seed, data, steps, wall time, machine, and the model's
evaluation against interpolation on the development held-out set). A zoo name works
wherever a model path does, the way Keras Hub presets do (``from_preset``); a path that
exists always wins over a name.

Every recipe trains on the embedded sample set only; the development set (real images
of modalities and scanners the sample set lacks, ``sr_tf.io.samples.DEVELOPMENT_DICOMS``)
is for quality figures, never for training.
"""

import dataclasses
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where zoo models are looked up and built; SR_TF_ZOO overrides it.
ZOO_DIR = os.environ.get("SR_TF_ZOO", os.path.join(ROOT, "saved_models"))
KERAS_FILE = "generator.keras"
TFLITE_FILE = "model_float16.tflite"
CARD_FILE = "model_card.json"
BUILD_FILE = "zoo_build.json"  # in the run folder: the training command and its wall time
SAMPLES_DIR = os.path.join(ROOT, "tfrecords", "samples")
DEVELOPMENT_DIR = os.path.join(ROOT, "tfrecords", "development")
RUNS_DIR = os.path.join(ROOT, "runs", "zoo")


class ZooError(ValueError):
    """A zoo name that is unknown, not built, or whose files are missing or corrupt."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one zoo model is trained: ``train.py`` flags on the embedded sample set."""

    name: str
    model: str
    scale: int
    description: str
    flags: tuple
    degradation: str = "bicubic"
    kind: str = "psnr"  # psnr: trained for fidelity | perceptual: adversarially fine-tuned
    init_from: str = None  # a zoo model this one is fine-tuned from

    @property
    def seed(self):
        """The training seed (``--seed=`` in the flags; train.py's default 0 otherwise)."""
        return next((int(f.split("=", 1)[1]) for f in self.flags if f.startswith("--seed=")), 0)

    def command(self, run_dir):
        """The exact training command line (as a list of arguments)."""
        args = [sys.executable, os.path.join(ROOT, "train.py"), f"--model={self.model}", f"--scale={self.scale}",
                f"--degradation={self.degradation}", f"--data={SAMPLES_DIR}", f"--run_dir={run_dir}",
                "--progress=false", *self.flags]
        if self.init_from:
            args.append(f"--init_from={folder(self.init_from)}")
        return args


_PSNR = ("--pixel_loss=l1", "--lr_schedule=cosine", "--ema_decay=0.999", "--augment", "--seed=0")

RECIPES = {
    recipe.name: recipe
    for recipe in (
        Recipe("residual_cnn_x2", "residual_cnn", 2, "light residual CNN (five 3x3 layers) over bicubic, x2",
               (*_PSNR, "--steps=5000", "--batch_size=16", "--patch_size=48", "--learning_rate=1e-3",
                "--eval_every=1000", "--checkpoint_every=1000", "--max_minutes=15")),
        Recipe("residual_cnn_x4", "residual_cnn", 4, "light residual CNN (five 3x3 layers) over bicubic, x4",
               (*_PSNR, "--steps=3000", "--batch_size=16", "--patch_size=64", "--learning_rate=1e-3",
                "--eval_every=1000", "--checkpoint_every=1000", "--max_minutes=15")),
        Recipe("swift_srgan_x2", "swift_srgan", 2, "Swift-SRGAN generator, residual form, pixel loss only, x2",
               (*_PSNR, "--steps=2400", "--pretrain_steps=2400", "--batch_size=16", "--patch_size=64",
                "--learning_rate=1e-3", "--eval_every=600", "--checkpoint_every=600", "--max_minutes=15")),
        Recipe("swift_srgan_x4", "swift_srgan", 4, "Swift-SRGAN generator, residual form, pixel loss only, x4",
               (*_PSNR, "--steps=2800", "--pretrain_steps=2800", "--batch_size=16", "--patch_size=96",
                "--learning_rate=1e-3", "--eval_every=700", "--checkpoint_every=700", "--max_minutes=15")),
        Recipe("srgan_x4", "srgan", 4, "SRResNet (SRGAN generator), residual form, pixel loss only, x4",
               (*_PSNR, "--steps=1300", "--pretrain_steps=1300", "--batch_size=16", "--patch_size=96",
                "--learning_rate=5e-4", "--eval_every=650", "--checkpoint_every=650", "--max_minutes=15")),
        Recipe("vq_autoencoder_x4_artifacts", "vq_autoencoder", 4,
               "VQ autoencoder that removes the artifacts of x4 bilinear interpolation (same size in and out)",
               (*_PSNR, "--steps=3000", "--batch_size=8", "--patch_size=64", "--learning_rate=5e-4",
                '--model_options={"filters": 64}', "--eval_every=1000", "--checkpoint_every=1000",
                "--max_minutes=15"),
               degradation="bilinear_artifacts"),
        Recipe("swift_srgan_x4_gan", "swift_srgan", 4,
               "Swift-SRGAN x4 fine-tuned adversarially from swift_srgan_x4 (perceptual: judge by its consistency)",
               ("--pixel_loss=l1", "--lr_schedule=cosine", "--ema_decay=0", "--augment", "--seed=0",
                "--steps=500", "--pretrain_steps=0", "--batch_size=16", "--patch_size=96", "--learning_rate=1e-4",
                "--warmup_steps=0", "--perceptual_weights=random", "--eval_every=250", "--checkpoint_every=250",
                "--max_minutes=15"),
               kind="perceptual", init_from="swift_srgan_x4"),
    )
}


def names():
    return tuple(RECIPES)


def folder(name):
    """The folder of zoo model ``name`` (whether or not it is built)."""
    _recipe(name)
    return os.path.join(ZOO_DIR, name)


def _recipe(name):
    if name not in RECIPES:
        raise ZooError(f"unknown zoo model {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


def looks_like_name(source):
    """A plain word (no folder, no extension) that does not exist as a path."""
    text = os.fspath(source)
    return not os.path.exists(text) and os.sep not in text and "." not in text


def resolve(source):
    """The path for ``source``: itself when it exists, the zoo folder for a zoo name
    (ZooError when that model is not built or its files are missing), and ZooError listing
    the known names for a plain word that is neither."""
    text = os.fspath(source)
    if os.path.exists(text):
        return text
    if text in RECIPES:
        path = folder(text)
        for required in (KERAS_FILE, CARD_FILE):
            if not os.path.isfile(os.path.join(path, required)):
                raise ZooError(f"zoo model {text!r}: {os.path.join(path, required)} is missing; "
                               f"build it with `python zoo.py --build={text}`")
        return path
    if looks_like_name(text):
        raise ZooError(f"{text}: neither a file nor a zoo model; zoo models: {', '.join(RECIPES)}")
    return text


def keras_path(source):
    """The ``.keras`` file of ``source``: a ``.keras`` file, a run or zoo folder, or a zoo name."""
    path = resolve(source)
    if os.path.isdir(path):
        path = os.path.join(path, KERAS_FILE)
    if not os.path.isfile(path):
        raise ZooError(f"{source}: no {KERAS_FILE} at {path}")
    return path


def load(name):
    """The Keras model of zoo model ``name``; ZooError naming the file when it is corrupt."""
    import keras

    import sr_tf.models  # noqa: F401  (registers the model classes)

    path = keras_path(name)
    if not zipfile.is_zipfile(path):
        raise ZooError(f"zoo model {name!r}: {path} cannot be loaded (not a valid .keras archive: truncated?)")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # a truncated zip, a foreign file: whatever the loader raises
        raise ZooError(f"zoo model {name!r}: {path} cannot be loaded ({type(exc).__name__}: {exc})") from exc


def built():
    """The zoo models whose files are in place, in recipe order."""
    return tuple(name for name in RECIPES
                 if all(os.path.isfile(os.path.join(ZOO_DIR, name, f)) for f in (KERAS_FILE, CARD_FILE)))


def best_for(modality=None):
    """The built fidelity (PSNR) super-resolution model with the largest PSNR gain over
    bicubic on the development set for ``modality`` (pooled over all images when the set
    has none of it, or when ``modality`` is None); None when no such model is built."""
    best, best_gain = None, -float("inf")
    for name in built():
        recipe = RECIPES[name]
        if recipe.kind != "psnr" or recipe.degradation != "bicubic":
            continue
        try:
            summary = card(name)["evaluation"]["summary"]
        except (OSError, KeyError, ValueError):
            continue
        methods = summary.get(modality) or summary.get("all")
        if not methods:
            continue
        gain = methods["model"]["psnr"] - methods["bicubic"]["psnr"]
        if gain > best_gain:
            best, best_gain = name, gain
    return best


def card(name):
    with open(os.path.join(resolve(name), CARD_FILE), encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- building


def machine():
    """What the model was trained on: CPU model, cores, vector extensions, accelerators."""
    import tensorflow as tf

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    vector = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    return {"cpu": cpu, "cores": os.cpu_count(), "vector_extensions": vector, "gpus": gpus,
            "python": platform.python_version(), "tensorflow": tf.__version__}


def _records(folder, paths, split_map, progress=False):
    """The records in ``folder``, converted from ``paths`` with ``split_map`` when the
    folder holds no readable manifest yet; returns the manifest."""
    from sr_tf import conversion as convert
    from sr_tf import records

    try:
        return records.read_manifest(folder)
    except records.RecordsError:
        pass
    return convert.convert(paths(), folder, convert.Options(split_map=dict(split_map)), progress=progress)


def development_records():
    """The development held-out set as records (built once into ``DEVELOPMENT_DIR``),
    every image in the ``test`` split."""
    from sr_tf.io import samples

    counts = _records(DEVELOPMENT_DIR, samples.development_paths, samples.DEVELOPMENT_SPLITS)["counts"]
    if counts.get("train") or counts.get("val") or not counts.get("test"):
        raise ZooError(f"{DEVELOPMENT_DIR}: the development images must all be in the test split ({counts})")
    return DEVELOPMENT_DIR


def sample_records(folder=SAMPLES_DIR, progress=False):
    """The embedded sample set as records in ``folder`` (converted once); returns the folder."""
    from sr_tf.io import samples

    _records(folder, samples.sample_paths, samples.SAMPLE_SPLITS, progress)
    return folder


def evaluate(source, recipe, output_dir, figures=0, consistency="none", ensemble=False, adapt_steps=0):
    """``(rows, summary)`` of ``source`` on the development set with the recipe's
    degradation and scale (``sr_tf.evaluation``); ``consistency="project"`` adds the
    model followed by data-consistency projection (method ``model+projection``),
    ``ensemble`` its self-ensemble (``model+ensemble``), ``adapt_steps`` a copy adapted
    to each image (``model+adaptation``)."""
    from sr_tf import evaluation, inference

    predictor = inference.load_predictor(source)
    config = evaluation.EvalConfig(data=development_records(), split="test", scale=recipe.scale,
                                   degradation=recipe.degradation, figures=figures, consistency=consistency,
                                   ensemble=ensemble, adapt_steps=adapt_steps)
    return evaluation.run(predictor, config, output_dir, progress=False)


def build(name, say=print):
    """Train zoo model ``name`` on the sample set, then :func:`package` it. Returns the card."""
    recipe = _recipe(name)
    if recipe.init_from and not os.path.isfile(os.path.join(folder(recipe.init_from), KERAS_FILE)):
        raise ZooError(f"{name} is fine-tuned from {recipe.init_from}: build that first")
    sample_records()
    run_dir = os.path.join(RUNS_DIR, name)
    shutil.rmtree(run_dir, ignore_errors=True)
    command = recipe.command(run_dir)
    say(f"[{name}] training: {' '.join(command[1:])}")
    started = time.time()
    subprocess.run(command, check=True, cwd=ROOT)
    from sr_tf.io import files

    files.write_json_atomic(os.path.join(run_dir, BUILD_FILE),
                            {"command": command, "wall_seconds": round(time.time() - started, 1)})
    return package(name, say)


def _relative(value):
    """``value`` with this checkout's absolute paths made relative to it (cards travel)."""
    if isinstance(value, str):
        return value.replace(ROOT + os.sep, "").replace(ROOT, ".")
    if isinstance(value, dict):
        return {k: _relative(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v) for v in value]
    return value


def package(name, say=print):
    """Publish the trained run of zoo model ``name`` (``runs/zoo/<name>``) into its folder:
    its ``generator.keras``, the float16 TFLite export and the model card with the
    training command, time and machine and the development-set evaluation.

    The folder is assembled under a temporary name and renamed when complete; an earlier
    build is replaced only then. Returns the model card.
    """
    from sr_tf import evaluation, export
    from sr_tf.io import files

    recipe = _recipe(name)
    run_dir = os.path.join(RUNS_DIR, name)
    try:
        with open(os.path.join(run_dir, "result.json"), encoding="utf-8") as f:
            result = json.load(f)
    except OSError as exc:
        raise ZooError(f"{name}: no finished training run in {run_dir} ({exc}); build it first") from exc
    try:
        with open(os.path.join(run_dir, BUILD_FILE), encoding="utf-8") as f:
            built = json.load(f)
    except OSError:
        built = {"command": recipe.command(run_dir), "wall_seconds": None}
    staging = export.staging_path(folder(name))
    exported = staging + "-export"
    try:
        say(f"[{name}] exporting float16 TFLite")
        report = export.export(run_dir, exported, variants=("float16",))
        os.makedirs(staging)
        shutil.copy2(os.path.join(run_dir, KERAS_FILE), os.path.join(staging, KERAS_FILE))
        shutil.copy2(os.path.join(exported, TFLITE_FILE), os.path.join(staging, TFLITE_FILE))
        with open(os.path.join(exported, CARD_FILE), encoding="utf-8") as f:
            model_card = json.load(f)
        say(f"[{name}] evaluating on the development set")
        _, summary = evaluate(run_dir, recipe, os.path.join(run_dir, "development"))
        model_card.update(
            name=name,
            description=recipe.description,
            kind=recipe.kind,
            form=_form(model_card.get("training") or {}),
            reproduce=f"python zoo.py --build={name}",
            command=shlex.join(["python", "train.py", *built["command"][2:]]),
            seed=recipe.seed,
            init_from=recipe.init_from,
            trained={"steps": result["step"], "timed_out": result["timed_out"],
                     "train_seconds": result["train_seconds"], "wall_seconds": built["wall_seconds"],
                     "weights": result["weights"], "date": datetime.date.today().isoformat(),
                     "machine": machine()},
            validation=result["val"],
            evaluation=_evaluation_entry(summary),
            tflite_parity_db=report["variants"]["float16"].get("psnr_db"),
            files=[export.file_entry(staging, KERAS_FILE), export.file_entry(staging, TFLITE_FILE)],
            consistency_warning=evaluation.consistency_warning(summary["all"]),
        )
        files.write_json_atomic(os.path.join(staging, CARD_FILE), _relative(model_card))
        export.replace_folder(staging, os.path.abspath(folder(name)))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(exported, ignore_errors=True)
    say(f"[{name}] published in {folder(name)}")
    return model_card


def _form(training):
    options = training.get("model_options") or {}
    if training.get("model") in ("srgan", "swift_srgan"):
        return "published (tanh head)" if options.get("residual") is False else "residual (bicubic + correction)"
    return "residual (interpolation + correction)"


def _evaluation_entry(summary):
    """The card's evaluation: per modality and pooled, each method's mean metrics."""
    keep = ("n", "psnr", "ssim", "nrmse", "consistency_psnr")
    return {
        "data": "development held-out set: " + ", ".join(_development_names()),
        "split": "test",
        "metrics": "PSNR/SSIM on [0, 1], border of `scale` pixels shaved; consistency: PSNR of the output "
                   "degraded again against its LR input",
        "summary": {modality: {method: {k: round(v, 4) if isinstance(v, float) else v
                                        for k, v in values.items() if k in keep}
                               for method, values in methods.items()}
                    for modality, methods in summary.items()},
    }


def _development_names():
    from sr_tf.io import samples

    return samples.DEVELOPMENT_DICOMS
