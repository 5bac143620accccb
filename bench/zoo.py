"""Every zoo model against interpolation on the development held-out set -> docs/RESULTS.md.

    python -m bench.zoo                       # all built zoo models; rewrites docs/RESULTS.md
    python -m bench.zoo --models residual_cnn_x2 --no_write

For each model in saved_models/ (``sr_tf.zoo``), the development set (real MR and CT
images the sample set lacks: ``sr_tf.io.samples.DEVELOPMENT_DICOMS``) is degraded as
the model was trained (its degradation and scale, the same per-image seed as evaluate.py)
and the model is measured beside nearest, bilinear, bicubic and Lanczos upsampling of the
same LR: PSNR, SSIM and data consistency per image, per modality and pooled, with one
comparison figure per model; and the model followed by data-consistency projection
(``sr_tf.consistency``), its self-ensemble over the 8 flips and rotations
(``sr_tf.ensemble``) and a copy adapted to each image (``sr_tf.adaptation``), each with
its time per image. The targets of the zoo are checked and printed as they
stand, met or not. The README's results table is rewritten from the same figures.
"""

import argparse
import collections
import math
import os
import re
import shutil
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "RESULTS.md")
FIGURES = os.path.join(ROOT, "docs", "zoo")
README = os.path.join(ROOT, "README.md")
METHODS = ("model", "nearest", "bilinear", "bicubic", "lanczos")
FIGURE_IMAGE = "MR-SIEMENS-DICOM-WithOverlays.dcm"  # the largest development image
# Targets on the development set (pooled over its images).
BEST_GAIN_DB = {2: 1.5, 4: 1.0}  # the best model of a scale over bicubic
CONSISTENCY_SLACK_DB = 0.5  # a PSNR model's consistency at most this under bicubic's
PROJECTED = "model+projection"  # sr_tf.evaluation's method name of the model with projection after it
PROJECTED_CONSISTENCY_DB = 60.0  # every model's consistency with projection
PROJECTED_GAIN_DB = 0.3  # a PSNR model's PSNR gain from projection
ENSEMBLED = "model+ensemble"
ADAPTED = "model+adaptation"
ADAPT_GAIN_DB = 0.3  # adaptation's gain at x2 on a 512 x 512 image ...
ADAPT_SECONDS = 60.0  # ... in at most this time
ADAPT_IMAGE = "explicit_VR-UN.dcm"  # the development set's 512 x 512 image


def parse_args(argv=None):
    from sr_tf import zoo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None, choices=list(zoo.RECIPES),
                        help="zoo models to evaluate (default: every built one)")
    parser.add_argument("--no_write", action="store_true", help="print only; leave docs/ and the README alone")
    parser.add_argument("--ensemble", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure each model's self-ensemble")
    parser.add_argument("--adapt_steps", type=int, default=None,
                        help="adaptation steps per image (default: sr_tf.adaptation.DEFAULT_STEPS; 0: not measured)")
    return parser.parse_args(argv)


def built_models(wanted=None):
    from sr_tf import zoo

    names = []
    for name in wanted or zoo.RECIPES:
        try:
            zoo.resolve(name)
            names.append(name)
        except zoo.ZooError as exc:
            print(f"skipping {name}: {exc}")
    return names


def evaluate_model(name, scratch, ensemble=True, adapt_steps=0):
    """Per-image rows of ``name`` and the path of its comparison figure (in ``scratch``)."""
    from sr_tf import zoo

    recipe = zoo.RECIPES[name]
    output = os.path.join(scratch, name)
    adapt_steps = adapt_steps if recipe.scale > 1 and recipe.degradation != "bilinear_artifacts" else 0
    rows, _ = zoo.evaluate(name, recipe, output, figures=64, consistency="project", ensemble=ensemble,
                           adapt_steps=adapt_steps)
    order = list(dict.fromkeys(row["image"] for row in rows))
    wanted = next((i for i, image in enumerate(order) if image.startswith(FIGURE_IMAGE)), 0)
    return rows, os.path.join(output, f"figure_{wanted:02d}.png")


def _mean(rows, name, method, metric, modality=None):
    values = [r[metric] for r in rows if r["model"] == name and r["method"] == method
              and (modality is None or r["modality"] == modality)]
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _file_mean(rows, name, method, metric):
    """Mean over the development files (each file weighted once, whatever its frames)."""
    per_file = collections.defaultdict(list)
    for r in rows:
        if r["model"] == name and r["method"] == method and math.isfinite(r[metric]):
            per_file[r["image"].split("#")[0]].append(r[metric])
    return float(np.mean([np.mean(v) for v in per_file.values()])) if per_file else float("nan")


def targets(rows, names):
    """(line, met) for every target of the zoo on the pooled development set."""
    from sr_tf import zoo

    checks = []
    for name in names:
        with_projection = {m: _mean(rows, name, PROJECTED, m) for m in ("psnr", "ssim", "consistency_psnr")}
        if math.isnan(with_projection["psnr"]):
            continue
        model = {m: _mean(rows, name, "model", m) for m in ("psnr", "ssim")}
        checks.append((f"{name} consistency with projection at least {PROJECTED_CONSISTENCY_DB:.0f} dB: "
                       f"{with_projection['consistency_psnr']:.2f} dB",
                       with_projection["consistency_psnr"] >= PROJECTED_CONSISTENCY_DB))
        if zoo.RECIPES[name].kind == "psnr":
            gain = with_projection["psnr"] - model["psnr"]
            checks.append((f"{name} PSNR up at least +{PROJECTED_GAIN_DB} dB with projection, SSIM not lower: "
                           f"{gain:+.2f} dB, SSIM {model['ssim']:.4f} -> {with_projection['ssim']:.4f}",
                           gain >= PROJECTED_GAIN_DB and with_projection["ssim"] >= model["ssim"]))
    for name in names:
        if zoo.RECIPES[name].scale != 2:
            continue
        picked = [r for r in rows if r["model"] == name and r["image"].startswith(ADAPT_IMAGE)]
        got = {r["method"]: r for r in picked}
        if ADAPTED in got and "model" in got:
            gain, seconds = got[ADAPTED]["psnr"] - got["model"]["psnr"], got[ADAPTED]["seconds"]
            checks.append((f"{name} adapted to the 512 x 512 `{ADAPT_IMAGE}` at least +{ADAPT_GAIN_DB} dB in at most "
                           f"{ADAPT_SECONDS:.0f} s: {gain:+.2f} dB in {seconds:.0f} s",
                           gain >= ADAPT_GAIN_DB and seconds <= ADAPT_SECONDS))
    for scale, wanted in BEST_GAIN_DB.items():
        candidates = [n for n in names if zoo.RECIPES[n].scale == scale and zoo.RECIPES[n].kind == "psnr"
                      and zoo.RECIPES[n].degradation == "bicubic"]
        if not candidates:
            continue
        gains = {n: _mean(rows, n, "model", "psnr") - _mean(rows, n, "bicubic", "psnr") for n in candidates}
        best = max(gains, key=gains.get)
        checks.append((f"best x{scale} model ({best}) at least +{wanted} dB PSNR over bicubic: "
                       f"{gains[best]:+.2f} dB", gains[best] >= wanted))
    for name in names:
        recipe = zoo.RECIPES[name]
        if recipe.kind != "psnr":
            continue
        model = {m: _mean(rows, name, "model", m) for m in ("psnr", "ssim", "consistency_psnr")}
        for baseline in ("bicubic", "lanczos"):
            base = {m: _mean(rows, name, baseline, m) for m in ("psnr", "ssim")}
            checks.append((f"{name} above {baseline} in PSNR ({model['psnr']:.2f} vs {base['psnr']:.2f} dB) and SSIM "
                           f"({model['ssim']:.4f} vs {base['ssim']:.4f})",
                           model["psnr"] > base["psnr"] and model["ssim"] > base["ssim"]))
        bicubic = _mean(rows, name, "bicubic", "consistency_psnr")
        checks.append((f"{name} consistency at most {CONSISTENCY_SLACK_DB} dB under bicubic's "
                       f"({model['consistency_psnr']:.2f} vs {bicubic:.2f} dB)",
                       model["consistency_psnr"] >= bicubic - CONSISTENCY_SLACK_DB))
    return checks


def results_table(rows, names):
    """The headline table: every model, pooled over the development images."""
    from sr_tf import zoo

    lines = ["| model | kind | x | model PSNR / SSIM | bicubic | Lanczos | gain vs bicubic / Lanczos | "
             "consistency model / bicubic | with projection PSNR / SSIM / consistency, time per image |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        recipe = zoo.RECIPES[name]
        psnr = {meth: _mean(rows, name, meth, "psnr") for meth in METHODS}
        ssim = {meth: _mean(rows, name, meth, "ssim") for meth in METHODS}
        cons = {meth: _mean(rows, name, meth, "consistency_psnr") for meth in METHODS}
        task = f"{recipe.scale}" + (" (artifacts)" if recipe.degradation == "bilinear_artifacts" else "")
        lines.append(
            f"| `{name}` | {recipe.kind} | {task} | {psnr['model']:.2f} / {ssim['model']:.4f} | "
            f"{psnr['bicubic']:.2f} / {ssim['bicubic']:.4f} | {psnr['lanczos']:.2f} / {ssim['lanczos']:.4f} | "
            f"{psnr['model'] - psnr['bicubic']:+.2f} / {psnr['model'] - psnr['lanczos']:+.2f} dB | "
            f"{cons['model']:.2f} / {cons['bicubic']:.2f} dB | "
            f"{_mean(rows, name, PROJECTED, 'psnr'):.2f} / {_mean(rows, name, PROJECTED, 'ssim'):.4f} / "
            f"{_mean(rows, name, PROJECTED, 'consistency_psnr'):.1f} dB, "
            f"{_mean(rows, name, PROJECTED, 'seconds'):.3f} s (model {_mean(rows, name, 'model', 'seconds'):.3f} s) |"
        )
    return "\n".join(lines)


def projection_table(rows, names):
    """Every model without and with data-consistency projection, and the time per image of each."""
    lines = ["| model | kind | x | model PSNR / SSIM / consistency | with projection | change | "
             "squared error removed | time per image model / with projection |", "|---|---|---|---|---|---|---|---|"]
    from sr_tf import zoo

    for name in names:
        recipe = zoo.RECIPES[name]
        task = f"{recipe.scale}" + (" (artifacts)" if recipe.degradation == "bilinear_artifacts" else "")
        cells = []
        for method in ("model", PROJECTED):
            cells.append(f"{_mean(rows, name, method, 'psnr'):.2f} / {_mean(rows, name, method, 'ssim'):.4f} / "
                         f"{_mean(rows, name, method, 'consistency_psnr'):.1f} dB")
        change = (f"{_mean(rows, name, PROJECTED, 'psnr') - _mean(rows, name, 'model', 'psnr'):+.2f} dB / "
                  f"{_mean(rows, name, PROJECTED, 'ssim') - _mean(rows, name, 'model', 'ssim'):+.4f}")
        times = f"{_mean(rows, name, 'model', 'seconds'):.3f} / {_mean(rows, name, PROJECTED, 'seconds'):.3f} s"
        lines.append(f"| `{name}` | {recipe.kind} | {task} | {cells[0]} | {cells[1]} | {change} | "
                     f"{100 * error_removed(rows, name):.1f} % | {times} |")
    return "\n".join(lines)


def error_removed(rows, name):
    """Mean over images of the share of the model's squared error that projection removes
    (1 - MSE with projection / MSE of the model, from the two PSNRs of each image)."""
    psnr = collections.defaultdict(dict)
    for r in rows:
        if r["model"] == name and r["method"] in ("model", PROJECTED):
            psnr[r["image"]][r["method"]] = r["psnr"]
    shares = [1.0 - 10.0 ** (-(p[PROJECTED] - p["model"]) / 10.0) for p in psnr.values()
              if len(p) == 2 and math.isfinite(p[PROJECTED] - p["model"])]
    return float(np.mean(shares)) if shares else float("nan")


def extras_table(rows, names):
    """Every model with its self-ensemble and adapted to each image: PSNR / SSIM /
    consistency, the change against the model alone, and the time per image."""
    from sr_tf import zoo

    lines = ["| model | x | model PSNR / SSIM | with ensemble | change | time | with adaptation | change | time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        recipe = zoo.RECIPES[name]
        task = f"{recipe.scale}" + (" (artifacts)" if recipe.degradation == "bilinear_artifacts" else "")
        base = {m: _mean(rows, name, "model", m) for m in ("psnr", "ssim")}
        cells = [f"{base['psnr']:.2f} / {base['ssim']:.4f}"]
        for method in (ENSEMBLED, ADAPTED):
            # Against the model on the same images (adaptation skips those too small for it).
            images = {r["image"] for r in rows if r["model"] == name and r["method"] == method}
            same = [r for r in rows if r["image"] in images]
            psnr, ssim = _mean(same, name, method, "psnr"), _mean(same, name, method, "ssim")
            if math.isnan(psnr):
                cells += ["n/a", "", ""]
                continue
            model = {m: _mean(same, name, "model", m) for m in ("psnr", "ssim")}
            count = "" if len(images) == len({r["image"] for r in rows if r["model"] == name}) else f" ({len(images)} images)"
            cells += [f"{psnr:.2f} / {ssim:.4f} / {_mean(same, name, method, 'consistency_psnr'):.1f} dB{count}",
                      f"{psnr - model['psnr']:+.2f} dB / {ssim - model['ssim']:+.4f}",
                      f"{_mean(same, name, method, 'seconds'):.2f} s"]
        lines.append(f"| `{name}` | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def document(rows, names, figures, machine, adapt_steps=0):
    from sr_tf.io import samples
    from sr_tf import zoo

    images = list(dict.fromkeys(r["image"] for r in rows))
    lines = [
        "# Results: the model zoo on the development held-out set",
        "",
        "Written by `python -m bench.zoo` from the models in `saved_models/`; do not edit by hand.",
        "",
        "Every model trained on the embedded sample set only (README: two CTs, one chest radiograph, the "
        "MNI152 T1 template). The development held-out set is real images of scanners and patients the "
        "sample set lacks: " + ", ".join(f"`{n}`" for n in samples.DEVELOPMENT_DICOMS) +
        f" ({len(images)} images: the 10 frames of `emri_small.dcm` count as 10). Each image is degraded as "
        "the model was trained (bicubic downsampling, antialiased; for the artifact model, x4 bicubic "
        "downsampling then bilinear upsampling), the border of `scale` pixels is shaved, and PSNR/SSIM are "
        "on the fixed [0, 1] range of the stored window (CT -1024..3071 HU, MR 0..99.9th percentile). "
        "Consistency is the PSNR of the output degraded again against its own LR input: a model that "
        "shows what the input does not hold loses there.",
        "",
        f"Machine of this evaluation: {machine}.",
        "",
        "## All development images (mean over images)",
        "",
        results_table(rows, names),
        "",
        "Mean over the four files instead (each file once, `emri_small.dcm`'s frames averaged first):",
        "",
        "| model | model PSNR | bicubic | Lanczos | gain vs bicubic |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        model, bicubic = _file_mean(rows, name, "model", "psnr"), _file_mean(rows, name, "bicubic", "psnr")
        lines.append(f"| `{name}` | {model:.2f} | {bicubic:.2f} | {_file_mean(rows, name, 'lanczos', 'psnr'):.2f} | "
                     f"{model - bicubic:+.2f} |")
    lines += ["", "## With data-consistency projection", "",
              f"Each model followed by {_projection_text()} (`sr_tf.consistency`; the default of upscale.py, "
              "the app and export.py), against the model alone on the same images. Time per image: the whole "
              "tiled inference of one development image (model, then model and projection), on the machine "
              "below.", "",
              "The projection is the orthogonal projection onto the images whose degradation is the input, "
              "and the true image is one of them; so the error left is the model's error less the part the "
              "input can see (Pythagoras; exactly so without the clipping to [0, 1] and the shaved border): the "
              "column \"squared error removed\" is that part (mean over images), and an image's gain in dB is "
              "-10 log10(1 - share). A gain of +0.3 dB needs 6.7 % of the error to be visible in the "
              "input. The better a model reproduces its input (its consistency), the smaller that part: "
              "projection adds most to weak models. Another consistent image could only do better by knowing "
              "where the model errs beyond what the input shows.", "",
              projection_table(rows, names)]
    if any(r["method"] in (ENSEMBLED, ADAPTED) for r in rows):
        from sr_tf import adaptation

        lines += ["", "## With self-ensemble, with per-scan adaptation", "",
                  "Self-ensemble: the model averaged over the 8 flips and rotations of its input "
                  "(`sr_tf.ensemble`, `--ensemble`). Adaptation: a copy of the model fine-tuned on each LR "
                  f"input itself for {adapt_steps} steps (at most {adaptation.DEFAULT_SECONDS:.0f} s; batch "
                  f"{adaptation.DEFAULT_BATCH} crops of {adaptation.DEFAULT_PATCH} px, learning rate "
                  f"{adaptation.DEFAULT_LEARNING_RATE:g}, the weights' moving average at {adaptation.DEFAULT_AVERAGE:g}, "
                  "`sr_tf.adaptation`, `--adapt_steps`), then run; its "
                  "time includes the fine-tuning. Neither is combined with projection here. The artifact model "
                  "is not adapted (its input has no coarser level), nor are inputs whose pairs' inputs (the "
                  f"input over the scale) are under {adaptation.MIN_PAIR_SIDE} px, where adaptation measured a "
                  f"loss (under {adaptation.min_side(2)} px at x2, {adaptation.min_side(4)} px at x4: every "
                  "development image at x4, and the 64 x 64 MRs at x2): the change is against the model on the "
                  "images adapted to.", "",
                  extras_table(rows, names)]
    lines += ["", "## Targets", ""]
    for line, met in targets(rows, names):
        lines.append(f"- {'met' if met else '**not met**'}: {line}")
    lines += ["", "## Per modality", ""]
    for modality in sorted({r["modality"] for r in rows}):
        lines += [f"### {modality}", "", "| model | " + " | ".join(f"{m} PSNR / SSIM" for m in METHODS) +
                  " | consistency model / bicubic |", "|---|" + "---|" * (len(METHODS) + 1)]
        for name in names:
            cells = [f"{_mean(rows, name, m, 'psnr', modality):.2f} / {_mean(rows, name, m, 'ssim', modality):.4f}"
                     for m in METHODS]
            lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {_mean(rows, name, 'model', 'consistency_psnr', modality):.2f}"
                         f" / {_mean(rows, name, 'bicubic', 'consistency_psnr', modality):.2f} |")
        lines.append("")
    lines += ["## Per image: PSNR dB (model / bicubic / Lanczos)", "",
              "| image | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---|" * len(names)]
    for image in images:
        cells = []
        for name in names:
            got = {r["method"]: r["psnr"] for r in rows if r["model"] == name and r["image"] == image}
            cells.append(f"{got.get('model', float('nan')):.2f} / {got.get('bicubic', float('nan')):.2f} / "
                         f"{got.get('lanczos', float('nan')):.2f}")
        lines.append(f"| {image} | " + " | ".join(cells) + " |")
    lines += ["", "## Figures", "",
              f"`{FIGURE_IMAGE}`, LR | bicubic | model | HR | |model - HR|, with a zoomed centre:", ""]
    for name in names:
        if name in figures:
            lines += [f"`{name}` ({zoo.RECIPES[name].description}):", "",
                      f"![{name}](zoo/{os.path.basename(figures[name])})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _projection_text():
    from sr_tf import consistency

    return (f"data-consistency projection ({consistency.DEFAULT_ITERATIONS} iterations of back-projection, "
            f"step {consistency.DEFAULT_STEP:g})")


def update_readme(table, readme=README):
    """Replace the README's results table (between its results markers) with ``table``."""
    begin, end = "<!-- results:zoo -->", "<!-- /results:zoo -->"
    text = open(readme, encoding="utf-8").read()
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        print(f"{readme} has no {begin} section; README left alone")
        return
    text = pattern.sub(lambda _: f"{begin}\n{table}\n{end}", text)
    with open(readme + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(readme + ".tmp", readme)


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = parse_args(argv)
    from bench import report

    from sr_tf import adaptation

    adapt_steps = adaptation.DEFAULT_STEPS if args.adapt_steps is None else args.adapt_steps
    names = built_models(args.models)
    if not names:
        print("no zoo model is built: python zoo.py --build=all")
        return 1
    rows, figures = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            print(f"evaluating {name} ...", flush=True)
            model_rows, figure = evaluate_model(name, scratch, args.ensemble, adapt_steps)
            rows += [dict(row, model=name) for row in model_rows]
            if os.path.isfile(figure) and not args.no_write:
                os.makedirs(FIGURES, exist_ok=True)
                figures[name] = os.path.join(FIGURES, f"{name}.png")
                shutil.copyfile(figure, figures[name])
        text = document(rows, names, figures, report.machine(), adapt_steps)
    print(results_table(rows, names))
    for line, met in targets(rows, names):
        print(f"{'met' if met else 'NOT MET'}: {line}")
    if not args.no_write:
        with open(DOC + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(DOC + ".tmp", DOC)
        update_readme(results_table(rows, names))
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
