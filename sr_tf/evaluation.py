"""Honest evaluation: a model against interpolation baselines on whole images.

Each test image is degraded exactly as in training (same preset, same per-image seed
as the validation pipeline), the border of ``scale`` pixels is shaved, and every
method (the model; nearest, bilinear, bicubic and Lanczos upsampling of the same LR)
is measured on the fixed [0, 1] range:

- PSNR with data_range 1 and SSIM (11x11 Gaussian, sigma 1.5, K1 0.01, K2 0.03);
- NRMSE (RMSE over the reference's RMS);
- data consistency: PSNR between the method's output degraded again (the preset's
  deterministic downsampling) and the LR input. A model that invents structure the
  input does not support loses consistency even when it looks sharp;
- with ``consistency="project"``, the model followed by data-consistency projection
  (``sr_tf.consistency``) as one more method, ``model+projection``, and the time per
  image of both;
- for CT, also RMSE and MAE in HU, and PSNR in HU over the stored window (which, the
  mapping being linear, equals the [0, 1] PSNR: a check that HU are recovered).

Outputs: ``per_image.csv``, ``summary.md`` (mean per modality and method, with the
model's gain over bicubic in dB), and figures LR | bicubic | model | HR | |error|.
"""

import csv
import dataclasses
import logging
import math
import os

import numpy as np
import tensorflow as tf

import time

from sr_tf import inference, intensity, metrics
from sr_tf.io import files as io_files

BASELINES = (("nearest", "nearest"), ("bilinear", "bilinear"), ("bicubic", "bicubic"), ("lanczos", "lanczos3"))
METRICS = ("psnr", "ssim", "nrmse", "consistency_psnr")
PROJECTED = "model+projection"  # the method name of the model followed by data-consistency projection
ENSEMBLED = "model+ensemble"  # the model averaged over the 8 flips and rotations (sr_tf.ensemble)
ADAPTED = "model+adaptation"  # a copy of the model adapted to each image first (sr_tf.adaptation)
CT_METRICS = ("rmse_hu", "mae_hu", "psnr_hu")
log = logging.getLogger(__name__)
# A model whose data consistency is more than this under bicubic's is flagged: its output,
# degraded again, does not reproduce its own input (the mark of invented structure).
CONSISTENCY_MARGIN_DB = 1.0


class EvaluationError(ValueError):
    """Evaluation cannot run (no images, incompatible model and data); says why."""


@dataclasses.dataclass
class EvalConfig:
    data: str
    split: str = "test"
    scale: int = 4
    degradation: str = "bicubic"
    seed: int = 0
    tile: int = inference.DEFAULT_TILE
    overlap: int = inference.DEFAULT_OVERLAP
    max_images: int = 0  # 0: all
    figures: int = 4
    verify_shards: bool = True  # check the shards' SHA-256 against the manifest first
    # "project": the model is also measured with data-consistency projection after it
    # (method "model+projection", sr_tf.consistency); "none": the model alone.
    consistency: str = "none"
    consistency_iterations: int = None  # None: sr_tf.consistency's defaults
    consistency_step: float = None
    # Also measure the model averaged over the 8 flips and rotations (method
    # "model+ensemble"), and a copy adapted to each image for this many steps first
    # ("model+adaptation", a Keras model only; 0: not measured).
    ensemble: bool = False
    adapt_steps: int = 0
    adapt_seconds: float = None  # None: sr_tf.adaptation's default
    adapt_seed: int = 0


def _lr_and_hr(example, config):
    """The model input and the reference, degraded as the validation pipeline does."""
    from sr_tf.data import degrade, pipeline

    preset = "bicubic" if config.degradation == "self_supervised" else config.degradation
    base_seed = tf.random.experimental.stateless_fold_in(degrade.as_seed(config.seed), 0)
    seed = pipeline.image_seed(base_seed, example)
    return degrade.apply(preset, example["image"], config.scale, seed)


def _degrade_back(image, config):
    """The deterministic downsampling of the degradation, to check consistency with the LR grid."""
    from sr_tf.data import degrade

    return degrade.downsample(image, config.scale, degrade.consistency_kernel(config.degradation))


def measure(hr, output, lr, config, window=None):
    """Every metric of one output against its reference; ``window`` (lo, hi) for CT in HU."""
    hr4, out4 = hr[tf.newaxis], tf.convert_to_tensor(output)[tf.newaxis]
    border = config.scale
    # PSNR keeps +inf (an exact reconstruction) and NaN (a broken output) as they are.
    values = {
        "psnr": float(metrics.psnr(hr4, out4, border=border)[0]),
        "ssim": float(metrics.ssim(hr4, out4, border=border)[0]),
        "nrmse": float(metrics.nrmse(hr4, out4, border=border)[0]),
        "consistency_psnr": float(metrics.psnr(lr[tf.newaxis], _degrade_back(out4, config))[0]),
    }
    if window is not None:
        lo, hi = window
        ref_hu = intensity.to_physical(metrics.shave(hr, border).numpy(), lo, hi)
        out_hu = intensity.to_physical(metrics.shave(output, border).numpy(), lo, hi)
        err = out_hu - ref_hu
        rmse = float(np.sqrt(np.mean(err**2)))
        values.update(
            rmse_hu=rmse,
            mae_hu=float(np.mean(np.abs(err))),
            psnr_hu=float("inf") if rmse == 0 else 20 * math.log10((hi - lo) / rmse),
        )
    return values


def run(predictor, config, output_dir, progress=True):
    """Evaluate ``predictor`` (``sr_tf.inference``) on ``config.split`` of ``config.data``.

    Returns ``(rows, summary)``: per-image rows and the summary dict
    ``{modality: {method: {metric: mean}}}``; writes the results folder.
    """
    from tqdm import tqdm

    from sr_tf import records
    from sr_tf.data import degrade, pipeline

    same_size = degrade.model_scale(config.degradation, config.scale) == 1
    if predictor.scale != degrade.model_scale(config.degradation, config.scale):
        raise EvaluationError(
            f"model {predictor.name} upscales x{predictor.scale}, but degradation {config.degradation!r} at "
            f"scale {config.scale} needs x{degrade.model_scale(config.degradation, config.scale)}"
        )
    projected = inference.with_consistency(predictor, config.consistency, config.consistency_iterations,
                                           config.consistency_step)
    projected = None if projected is predictor else projected  # a graph with the projection baked in is "model"
    ensembled = None
    if config.ensemble:
        from sr_tf import ensemble

        ensembled = ensemble.EnsemblePredictor(predictor)
    if config.adapt_steps:
        from sr_tf import adaptation

        adaptation.check(config.adapt_steps, config.adapt_seconds)
        if not isinstance(predictor, inference.KerasPredictor):
            raise EvaluationError(f"adaptation needs a Keras model (.keras, a run folder or a zoo name); "
                                  f"{predictor.path} is a {predictor.kind} model")
    total = records.record_count(config.data, config.split)
    if total == 0:
        raise EvaluationError(f"{config.data}: the {config.split!r} split has no records")
    divisor = degrade.target_divisor(config.degradation, config.scale)
    examples = pipeline.make_eval_dataset(config.data, config.split, multiple_of=divisor,
                                          verify_checksums=config.verify_shards)
    if config.max_images:
        examples = examples.take(config.max_images)
        total = min(total, config.max_images)
    os.makedirs(output_dir, exist_ok=True)
    rows, figures = [], []
    bar = tqdm(total=total, desc="evaluate", unit="image", disable=not progress, leave=False)
    for example in examples:
        model_input, hr = _lr_and_hr(example, config)
        # The LR grid the baselines upsample; for same-size restoration the model's
        # input is already an upsampled LR, so the grid is made again without it.
        lr = degrade.downsample(hr, config.scale) if same_size else model_input
        modality = example["modality"].numpy().decode()
        name = f"{os.path.basename(example['source'].numpy().decode())}#{int(example['slice_index'])}"
        window = None
        if modality == "CT":
            window = (float(example["intensity_min"]), float(example["intensity_max"]))
        seconds = {}
        outputs = {}
        for method, runner in (("model", predictor), (PROJECTED, projected), (ENSEMBLED, ensembled)):
            if runner is not None:
                started = time.perf_counter()
                outputs[method] = inference.tiled_predict(runner, model_input.numpy(), config.tile, config.overlap)
                seconds[method] = time.perf_counter() - started
        if config.adapt_steps:
            from sr_tf import adaptation

            started = time.perf_counter()
            try:  # an input too small to adapt to has no model+adaptation row
                adapted = _adapted(predictor, model_input.numpy()[..., 0], config)
                outputs[ADAPTED] = inference.tiled_predict(adapted, model_input.numpy(), config.tile, config.overlap)
                seconds[ADAPTED] = time.perf_counter() - started  # adaptation and inference
            except adaptation.AdaptationError as exc:
                log.warning("%s: no %s row: %s", name, ADAPTED, exc)
        size = tf.shape(hr)[0:2]
        for method, tf_method in BASELINES:
            outputs[method] = metrics.upsample(lr, size, tf_method)
        for method, output in outputs.items():
            output = tf.convert_to_tensor(np.asarray(output, np.float32).reshape(hr.shape))
            row = {"image": name, "modality": modality, "method": method}
            row.update(measure(hr, output, lr, config, window))
            if method in seconds:
                row["seconds"] = seconds[method]
            rows.append(row)
        if len(figures) < config.figures:
            figures.append((name, lr.numpy(), np.asarray(outputs["bicubic"]), np.asarray(outputs["model"]).reshape(hr.shape), hr.numpy()))
        bar.update(1)
    bar.close()
    if not rows:
        raise EvaluationError(f"{config.data}: no image of the {config.split!r} split could be evaluated")
    summary = summarize(rows)
    write_csv(rows, os.path.join(output_dir, "per_image.csv"))
    with io_files.atomic_open(os.path.join(output_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(summary_markdown(summary, predictor.name, config, (projected or predictor).projection))
    for index, item in enumerate(figures):
        save_figure(*item, os.path.join(output_dir, f"figure_{index:02d}.png"))
    return rows, summary


def _adapted(predictor, lr, config):
    """A predictor of ``predictor``'s model adapted to ``lr`` (``sr_tf.adaptation``)."""
    keywords = dict(steps=config.adapt_steps, seed=config.adapt_seed)
    if config.adapt_seconds is not None:
        keywords["seconds"] = config.adapt_seconds
    return inference.adapted(predictor, lr, degradation=config.degradation, **keywords)


def write_csv(rows, path):
    columns = ["image", "modality", "method", *METRICS, *CT_METRICS, "seconds"]
    with io_files.atomic_open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def summarize(rows):
    """Mean of every metric per modality and method (``all`` pools the modalities).

    Infinite PSNR (an exact reconstruction) is kept out of the mean and counted apart;
    a NaN (a model that produced NaN) is not an exact reconstruction: it makes the mean NaN.
    """
    summary = {}
    for modality in sorted({r["modality"] for r in rows}) + ["all"]:
        for method in dict.fromkeys(r["method"] for r in rows):
            chosen = [r for r in rows if r["method"] == method and modality in ("all", r["modality"])]
            if not chosen:
                continue
            entry = {"n": len(chosen)}
            for metric in (*METRICS, *CT_METRICS):
                values = [r[metric] for r in chosen if metric in r]
                finite = [v for v in values if v != math.inf]
                if values:
                    entry[metric] = float(np.mean(finite)) if finite else float("inf")
                    if len(finite) < len(values):
                        entry[f"{metric}_infinite"] = len(values) - len(finite)
            summary.setdefault(modality, {})[method] = entry
    return summary


def consistency_warning(methods):
    """The warning for one modality's methods when the model's consistency is more than
    ``CONSISTENCY_MARGIN_DB`` under bicubic's, else None."""
    model, bicubic = methods.get("model", {}), methods.get("bicubic", {})
    if "consistency_psnr" not in model or "consistency_psnr" not in bicubic:
        return None
    gap = bicubic["consistency_psnr"] - model["consistency_psnr"]
    if not gap > CONSISTENCY_MARGIN_DB:
        return None
    return (f"data consistency {model['consistency_psnr']:.2f} dB is {gap:.2f} dB under bicubic's "
            f"({bicubic['consistency_psnr']:.2f} dB): degraded again, the output does not reproduce its input; "
            "it may show structure the input does not support")


def summary_markdown(summary, model_name, config, projection=None):
    lines = [
        f"# Evaluation of {model_name}",
        "",
        f"Data `{config.data}`, split `{config.split}`, x{config.scale}, degradation `{config.degradation}`; "
        f"PSNR/SSIM on [0, 1] (data_range 1), {config.scale}-pixel border shaved; "
        "consistency = PSNR of the output degraded again against the LR input.",
        "",
    ]
    if projection is not None:
        where = (f"`{PROJECTED}` is the model followed by" if any(PROJECTED in m for m in summary.values())
                 else "The model's graph includes")
        lines += [f"{where} {projection.describe()}.", ""]
    for modality, methods in summary.items():
        lines += [f"## {modality}", "",
                  "| method | n | PSNR dB | SSIM | NRMSE | consistency dB | gain over bicubic dB |",
                  "|---|---|---|---|---|---|---|"]
        bicubic = methods.get("bicubic", {}).get("psnr")
        for method, m in methods.items():
            gain = m["psnr"] - bicubic if bicubic is not None and math.isfinite(m["psnr"]) else float("nan")
            lines.append(f"| {method} | {m['n']} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['nrmse']:.4f} | "
                         f"{m['consistency_psnr']:.2f} | {gain:+.2f} |")
        warning = consistency_warning(methods)
        if warning:
            lines += ["", f"**Flagged**: {warning}."]
        if any("rmse_hu" in m for m in methods.values()):
            lines += ["", "| method | RMSE HU | MAE HU | PSNR HU (stored window) |", "|---|---|---|---|"]
            for method, m in methods.items():
                if "rmse_hu" in m:
                    lines.append(f"| {method} | {m['rmse_hu']:.1f} | {m['mae_hu']:.1f} | {m['psnr_hu']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def console_summary(summary):
    out = []
    for modality, methods in summary.items():
        bicubic = methods.get("bicubic", {}).get("psnr", float("nan"))
        for method, m in methods.items():
            out.append(f"{modality:>4} {method:>16}: PSNR {m['psnr']:6.2f} dB  SSIM {m['ssim']:.4f}  "
                       f"consistency {m['consistency_psnr']:6.2f} dB  ({m['psnr'] - bicubic:+.2f} dB vs bicubic, n={m['n']})")
        warning = consistency_warning(methods)
        if warning:
            out.append(f"{modality:>4} FLAGGED: {warning}")
    return "\n".join(out)


def save_figure(name, lr, bicubic, model, hr, path, inset=0.25):
    """LR | bicubic | model | HR | |model - HR|, each with a zoomed inset of the centre."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mpl_toolkits.axes_grid1.inset_locator import inset_axes

    panels = [("LR", lr), ("bicubic", bicubic), ("model", model), ("HR", hr), ("|model - HR|", np.abs(model - hr))]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    h, w = hr.shape[:2]
    ch, cw = max(4, int(h * inset) // 2), max(4, int(w * inset) // 2)
    for ax, (title, image) in zip(axes, panels):
        image = np.squeeze(image)
        error = title.startswith("|")
        kwargs = dict(cmap="magma", vmin=0, vmax=max(1e-6, float(image.max()))) if error else dict(cmap="gray", vmin=0, vmax=1)
        ax.imshow(image, interpolation="nearest", **kwargs)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
        sy, sx = image.shape[0] / h, image.shape[1] / w  # LR panels are smaller
        cy, cx = image.shape[0] // 2, image.shape[1] // 2
        zoom = inset_axes(ax, width="40%", height="40%", loc="lower right", borderpad=0.2)
        zoom.imshow(image[int(cy - ch * sy):int(cy + ch * sy), int(cx - cw * sx):int(cx + cw * sx)],
                    interpolation="nearest", **kwargs)
        zoom.set_xticks([])
        zoom.set_yticks([])
        for spine in zoom.spines.values():
            spine.set_edgecolor("yellow")
    fig.suptitle(name, fontsize=9)
    # Inset axes do not take part in tight_layout; fixed margins instead.
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.86, wspace=0.05)
    with io_files.atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=100)
    plt.close(fig)
