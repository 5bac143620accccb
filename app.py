"""Demo app for reviewing a super-resolution model on one image: ``streamlit run app.py``.

Upload a DICOM, NIfTI or PNG/JPEG/TIFF X-ray (or pick an embedded sample), pick a model
(it starts on the zoo model that gains most over bicubic for the input's modality; any
run or export in saved_models/exports/ or runs/, or a typed path; ``SR_APP_MODEL`` gives one to
start with), and
compare the input, bicubic and the model side by side on one synchronised zoom region,
with a CT window, the |bicubic - model| map, data-consistency PSNR/SSIM (each output
downsampled again against the input; data-consistency projection after the model, on by
default, makes it agree), the inference time and a download of the result
in the input's own format. Reading, tiled inference and writing are
``sr_tf.upscaling``'s; what the page computes for display is ``sr_tf.display``'s.
"""

import dataclasses
import hashlib
import math
import os
import tempfile
import time

import numpy as np
import streamlit as st

from sr_tf.io import samples
from sr_tf import adaptation, consistency, display, ensemble, inference, upscaling, zoo

ROOT = os.path.dirname(os.path.abspath(__file__))
MODEL_ROOTS = ("saved_models/exports", "runs")  # beside the zoo models, which zoo.built() lists
MODEL_ENV = "SR_APP_MODEL"  # a model path to start with
OTHER_MODEL = "another path..."
DISPLAY_SIDE = 768  # pixels of the longer side of each panel
# What the embedded samples are (sr_tf.io.samples), so that a reviewer knows what a
# click will run: the radiograph at x4 is 7820 x 7364 pixels of output.
SAMPLE_NOTES = {
    "RG1_UNCI.dcm": "chest radiograph, 1955 x 1841",
    "693_UNCI.dcm": "head CT, 512 x 512",
    "eCT_Supplemental.dcm": "enhanced CT, 2 frames of 512 x 512",
    "CT_small.dcm": "CT, 128 x 128",
    "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz": "MNI152 brain MR, 189 slices",
}
MIME_TYPES = {"dicom": "application/dicom", "nifti": "application/octet-stream", "raster": "image/png"}
KEEP_RESULTS = 3  # upscaled selections kept per browser session (a large radiograph x4 is ~0.5 GB)

NO_MODEL = """\
**No model found**: no zoo model in `saved_models/`, nothing in `saved_models/exports/` or `runs/`.
Build the zoo, train one, or export a trained one:

```sh
python zoo.py --build=residual_cnn_x2          # -> saved_models/residual_cnn_x2/
python train.py --model=swift_srgan            # -> runs/swift_srgan_x4/
python export.py --model=runs/swift_srgan_x4   # -> saved_models/exports/swift_srgan_x4/
```

or type the path of a run folder, an export folder, a `.keras` or a `.tflite` file in the
sidebar (or start the app with `SR_APP_MODEL=/path/to/model streamlit run app.py`).
"""


@dataclasses.dataclass
class Result:
    """One upscaled selection of an image, and what the page shows about it."""

    upscaled: np.ndarray  # (S', sH, sW) in [0, 1]
    slices: list | None  # the slice indices upscaled (None: all)
    seconds: float
    tiles: int
    bicubic: np.ndarray | None = None  # of the shown slice, with the metrics below
    consistency: dict | None = None  # {"model": {...}, "bicubic": {...}}: display.consistency
    uncertainty: np.ndarray | None = None  # (S', sH, sW): sr_tf.ensemble.uncertainty, with the ensemble on
    adaptation: object = None  # sr_tf.adaptation.AdaptationReport, when adapted to this image
    predictor: object = None  # what made it (the adapted copy, when adapted): what the download names
    download: tuple | None = None  # (bytes, file name), made on first display


# ----------------------------------------------------------------------------- cached loads


@st.cache_resource(show_spinner="Loading the model...", max_entries=4)
def get_predictor(path):
    return inference.load_predictor(path)


@st.cache_resource(show_spinner=False)
def upload_folder():
    """Where uploads are saved under their own names (the suggested output name and the
    NIfTI/DICOM readers go by the name); removed when the server exits."""
    return tempfile.TemporaryDirectory(prefix="sr_tf_app_")


@st.cache_resource(show_spinner="Reading the file...", max_entries=4)
def load_upload(name, digest, _data):
    folder = os.path.join(upload_folder().name, digest[:16])
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(_data)
    try:
        return upscaling.load(path)
    except upscaling.UpscaleError as exc:  # name the file as the user knows it
        raise upscaling.UpscaleError(str(exc).replace(path, name)) from None


@st.cache_resource(show_spinner="Reading the file...", max_entries=4)
def load_sample(path):
    return upscaling.load(path)


@st.cache_data(show_spinner=False)
def sample_files():
    return {os.path.basename(path): path for path in samples.sample_paths()}


# ----------------------------------------------------------------------------- page parts


def choose_model(modality=None):
    """The loaded predictor chosen in the sidebar, or None (the page says why). It starts
    on the zoo model best for ``modality`` (``zoo.best_for``), unless ``SR_APP_MODEL``
    names one."""
    st.sidebar.header("Model")
    shipped = list(zoo.built())
    found = display.find_models(*(os.path.join(ROOT, root) for root in MODEL_ROOTS))
    typed = os.environ.get(MODEL_ENV, "")
    options = [*shipped, *found, OTHER_MODEL]
    best = zoo.best_for(modality)
    start = options.index(OTHER_MODEL) if typed else options.index(best) if best in options else 0

    def label(path):
        if path in shipped:
            return f"{path} (zoo: {zoo.RECIPES[path].description})"
        return path if path == OTHER_MODEL else os.path.relpath(path, ROOT)

    path = st.sidebar.selectbox("Trained or exported model", options, index=start, format_func=label)
    if path == OTHER_MODEL:
        path = st.sidebar.text_input(
            "Model path", typed,
            help="A training run folder, an export folder (saved_models/exports/NAME), a SavedModel, a .keras, "
                 "a .tflite file or a zoo name.",
        ).strip()
    if not path:
        st.warning(NO_MODEL if not (found or shipped) else "Type the path of a model in the sidebar.")
        return None
    try:
        predictor = get_predictor(os.path.expanduser(path))
        scale = predictor.scale
    except Exception as exc:  # noqa: BLE001 - ValueError for a bad path or file; runtimes raise others
        st.sidebar.error(str(exc))
        st.error(f"Cannot use the model: {exc}")
        return None
    st.sidebar.markdown(f"**{predictor.name}**: x{scale}, {predictor.kind}")
    predictor = choose_ensemble(predictor)
    predictor = choose_consistency(predictor)
    if predictor is None:
        return None
    with st.sidebar.expander("Model card", expanded=False):
        st.json(predictor.card or predictor.config or {"note": "no model card or training config beside this model"})
    return predictor


def choose_ensemble(predictor):
    """``predictor``, or its self-ensemble with the spread (``sr_tf.ensemble``) when the
    sidebar asks for the uncertainty map."""
    on = st.sidebar.checkbox(
        "Uncertainty map (self-ensemble, 8x the time)", False,
        help="Averages the model over the 8 flips and rotations of its input; where the eight disagree, "
             "and where the output degraded again differs from its input, is shown in red over the output.")
    return ensemble.EnsemblePredictor(predictor, spread=True) if on else predictor


def choose_adaptation(predictor):
    """The adaptation keywords (``upscaling.adapted``) chosen in the sidebar, or None."""
    base = inference.innermost(predictor)
    steps = st.sidebar.number_input(
        "Adapt to this image (steps, 0: off)", 0, 2000, 0, 25,
        disabled=not isinstance(base, inference.KerasPredictor),
        help="Fine-tunes a copy of the model on the image itself (its own pairs, degraded once more) "
             f"for at most this many steps and {adaptation.DEFAULT_SECONDS:.0f} s. Keras models only.")
    return dict(steps=int(steps), seed=0) if steps else None


def choose_consistency(predictor):
    """``predictor`` with the data-consistency projection chosen in the sidebar after it
    (on by default, ``sr_tf.consistency.DEFAULT_MODE``), or None after saying why not."""
    if predictor.projection is not None:
        st.sidebar.caption(f"The model's graph includes {predictor.projection.describe()}.")
        return predictor
    on = st.sidebar.checkbox(
        "Data-consistency projection", consistency.DEFAULT_MODE == "project",
        help="After the model, iterative back-projection with the degradation's own kernel, so that the "
             "output, degraded again, reproduces the input.")
    iterations = st.sidebar.number_input("Projection iterations", 0, 200, consistency.DEFAULT_ITERATIONS, 1,
                                         disabled=not on)
    try:
        return inference.with_consistency(predictor, "project" if on else "none", int(iterations))
    except ValueError as exc:
        st.sidebar.error(str(exc))
        st.error(f"Cannot project the output of {predictor.name}: {exc}")
        return None


def choose_image():
    """(image, key (a tuple naming its content), file name) for the chosen upload or
    sample, or None after saying why."""
    source = st.radio("Image", ("Upload a file", "Sample image"), horizontal=True, label_visibility="collapsed")
    if source == "Sample image":
        files = sample_files()
        name = st.selectbox("Sample image", list(files), index=None, placeholder="Choose a sample",
                            format_func=lambda name: f"{name} ({SAMPLE_NOTES.get(name, 'sample')})")
        if name is None:
            return None
        try:
            return load_sample(files[name]), ("sample", files[name]), name
        except Exception as exc:  # noqa: BLE001 - the page reports every failure and goes on
            st.error(_reason(exc, name))
            return None
    uploaded = st.file_uploader("DICOM, NIfTI (.nii, .nii.gz) or PNG/JPEG/TIFF X-ray", key="upload")
    if uploaded is None:
        st.info("Upload a file, or pick a sample image.")
        return None
    name = os.path.basename(uploaded.name) or "upload"
    data = uploaded.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    try:
        return load_upload(name, digest, data), (name, digest), name
    except upscaling.UpscaleError as exc:
        st.error(f"Cannot read {exc}")
    except Exception as exc:  # noqa: BLE001 - a reader bug must not take the page down
        st.error(_reason(exc, name))
    return None


def _reason(exc, name):
    return f"Cannot read {name}: {type(exc).__name__}: {exc}"


def _mapping(image):
    """The physical values mapped to [0, 1]: one window, or one a volume (a 4-D NIfTI)."""
    if len({tuple(w) for w in image.windows}) == 1:
        lo, hi = image.window(0)
        return f"values {lo:g} to {hi:g}"
    return "each volume's values through its own window"


def describe(image, name):
    count, height, width = image.slices.shape
    spacing = " x ".join(f"{v:g}" for v in image.pixel_spacing) if any(image.pixel_spacing) else "unknown"
    what = f"{count} slices of {height} x {width}" if count > 1 else f"{height} x {width}"
    st.caption(
        f"**{name}**: {image.kind}, {image.modality}, {what} px, pixel spacing {spacing} mm, "
        f"{_mapping(image)} mapped to [0, 1]"
    )


def adapted_predictor(predictor, image, image_key, adapt):
    """``predictor`` with its model adapted to ``image`` (all its slices) with the
    sidebar's ``adapt`` settings. The adapted model is made once per image, model and
    settings, and whatever runs around it (projection, self-ensemble) is put around it
    again: the shown slice and the whole volume's download, with or without projection,
    come from the same adapted copy (under the seconds limit a second adaptation could
    stop at another step, and would cost its time again)."""
    cache = st.session_state.setdefault("adapted", {})
    key = (image_key, inference.innermost(predictor).path, repr(adapt))
    if key not in cache:
        with st.spinner(f"Adapting {predictor.name} to this image ({adapt['steps']} steps)..."):
            cache[key] = inference.innermost(upscaling.adapted(predictor, image, adapt))
        while len(cache) > KEEP_RESULTS:
            cache.pop(next(iter(cache)))
    return inference.replace_innermost(predictor, cache[key])


def run_upscale(predictor, image, image_key, slices, tile, overlap, adapt=None):
    report = None
    if adapt is not None:
        predictor = adapted_predictor(predictor, image, image_key, adapt)
        report = inference.innermost(predictor).adaptation
    spread = _has_spread(predictor)
    bar = st.progress(0.0, text="Upscaling...")
    tiles = [0]

    def progress(done, total):
        tiles[0] = total
        bar.progress(done / max(total, 1), text=f"Upscaling: {done} of {total} tiles")

    start = time.perf_counter()
    try:
        upscaled = upscaling.upscale(predictor, image, tile=tile, overlap=overlap, slices=slices, progress=progress,
                                     uncertainty=spread)
    finally:
        bar.empty()
    maps = None
    if spread:
        upscaled, maps = upscaled
    return Result(upscaled, slices, time.perf_counter() - start, tiles[0], uncertainty=maps, adaptation=report,
                  predictor=predictor)


def _has_spread(predictor):
    """Whether ``predictor`` runs the self-ensemble with its spread (under any projection)."""
    return any(isinstance(link, ensemble.EnsemblePredictor) and link.spread for link in inference.chain(predictor))


def result_for(predictor, image, key, name, slices, tile, overlap, adapt=None):
    """The session's Result for these settings, computed once (the oldest are dropped);
    None after showing why it failed."""
    results = st.session_state.setdefault("results", {})
    projection = predictor.projection and predictor.projection.card()["description"]
    result_key = (*key, predictor.path, projection, inference.describe(predictor), repr(adapt), tile, overlap,
                  "all" if slices is None else tuple(slices))
    if result_key not in results:
        try:
            results[result_key] = run_upscale(predictor, image, key, slices, tile, overlap, adapt)
        except Exception as exc:  # noqa: BLE001 - shown, and the next input still works
            st.error(f"Cannot upscale {name} with {predictor.name}: {type(exc).__name__}: {exc}")
            return None
        while len(results) > KEEP_RESULTS:
            results.pop(next(iter(results)))
    return results[result_key]


def display_controls(image):
    """The zoom box (LR pixels) and, for CT, the window (width, level) in HU, else None."""
    is_ct = image.modality == "CT"
    columns = st.columns(4 if is_ct else 3)
    zoom = columns[0].slider("Zoom", 1.0, 8.0, 1.0, 0.5, help="The same region in every panel.")
    centre_x = columns[1].slider("Zoom centre x (%)", 0, 100, 50)
    centre_y = columns[2].slider("Zoom centre y (%)", 0, 100, 50)
    window = None
    if is_ct:
        preset = columns[3].selectbox("CT window (HU)", [*display.WINDOW_PRESETS, "custom"],
                                      format_func=_window_label)
        if preset == "custom":
            custom = st.columns(4)
            width = custom[0].number_input("Window width (HU)", 1.0, 10000.0, 400.0, 10.0)
            level = custom[1].number_input("Window level (HU)", -2000.0, 5000.0, 40.0, 10.0)
            window = (width, level)
        else:
            window = display.WINDOW_PRESETS[preset]
    return display.zoom_box(*image.slices.shape[1:], zoom, centre_x / 100, centre_y / 100), window


def _window_label(name):
    if name not in display.WINDOW_PRESETS:
        return name
    width, level = display.WINDOW_PRESETS[name]
    return f"{name} (W{width:g} / L{level:g})"


def show_panels(mapped, lr, bicubic, output, scale, box, window, predictor):
    """``mapped``: the (lo, hi) physical values of the slice mapped to [0, 1]."""
    lr_crop = display.crop(lr, box)
    size = display.display_size(lr_crop.shape, DISPLAY_SIDE)
    region = f"{box[3] - box[2]} x {box[1] - box[0]} px region" if lr_crop.shape != lr.shape else "whole image"
    panels = (
        (f"LR input, {lr.shape[1]} x {lr.shape[0]} ({region})", lr, 1),
        (f"Bicubic x{scale}, {bicubic.shape[1]} x {bicubic.shape[0]}", bicubic, scale),
        (f"Model {predictor.name} x{scale}, {output.shape[1]} x {output.shape[0]}"
         f"{', with data-consistency projection' if predictor.projection else ''}", output, scale),
    )
    for column, (caption, values, factor) in zip(st.columns(3), panels):
        values = display.resize(display.crop(values, box, factor), size)
        if window is not None:
            values = display.window(values, *mapped, *window)
        column.image(display.to_uint8(values), caption=caption, width="stretch")


def show_difference(bicubic, output, scale, box, image, mapped, column):
    size = display.display_size(display.crop(bicubic, box, scale).shape, DISPLAY_SIDE)
    diff, full_scale = display.difference_map(display.crop(bicubic, box, scale), display.crop(output, box, scale), size)
    unit = (f"{full_scale * (mapped[1] - mapped[0]):.4g} HU" if image.modality == "CT"
            else f"{full_scale:.3g} of the range")
    column.image(display.to_uint8(diff), width="stretch",
                 caption=f"|bicubic - model| (inferno: black 0, yellow {unit} or more)")


def show_uncertainty(output, uncertainty, scale, box, image, mapped):
    """The uncertainty map in red over the output, and the fraction of pixels above the threshold."""
    threshold = ensemble.DEFAULT_THRESHOLD
    size = display.display_size(display.crop(output, box, scale).shape, DISPLAY_SIDE)
    layer = display.uncertainty_overlay(display.crop(output, box, scale), display.crop(uncertainty, box, scale),
                                        threshold, size)
    unit = f"{threshold * (mapped[1] - mapped[0]):.4g} HU" if image.modality == "CT" else f"{threshold:g} of the range"
    fraction = ensemble.fraction_above(uncertainty, threshold)
    st.image(display.to_uint8(layer), width="content",
             caption=f"Uncertainty over the output (red from {unit}: ensemble spread and consistency residual); "
                     f"{100 * fraction:.2f} % of the pixels above {unit}")


def _number(value, digits, unit=""):
    if math.isnan(value):
        return "n/a"
    return "inf" + unit if math.isinf(value) else f"{value:.{digits}f}{unit}"


def _delta(model, baseline, digits, unit=""):
    difference = model - baseline
    return f"{difference:+.{digits}f}{unit} vs bicubic" if math.isfinite(difference) else None


def show_metrics(result, tile, column):
    model, base = result.consistency["model"], result.consistency["bicubic"]
    column.markdown(
        "**Data consistency**: each output downsampled by the scale (antialiased bicubic) "
        "and compared with the input. Sharpness the input does not support lowers it."
    )
    row = column.columns(2)
    row[0].metric("PSNR, model", _number(model["psnr"], 2, " dB"), _delta(model["psnr"], base["psnr"], 2, " dB"))
    row[1].metric("PSNR, bicubic", _number(base["psnr"], 2, " dB"))
    row = column.columns(2)
    row[0].metric("SSIM, model", _number(model["ssim"], 4), _delta(model["ssim"], base["ssim"], 4))
    row[1].metric("SSIM, bicubic", _number(base["ssim"], 4))
    column.metric("Inference time", f"{result.seconds:.2f} s",
                  help=f"{result.tiles} tile(s) of up to {tile} LR pixels, tiled with overlap")


def offer_download(result, image, predictor, name):
    if result.download is None:
        try:
            result.download = upscaling.to_bytes(image, result.upscaled, result.predictor or predictor,
                                                 slices=result.slices)
        except Exception as exc:  # noqa: BLE001 - a writer failure is shown; the page goes on
            st.error(f"Cannot write the result of {name}: {exc}")
            return
    data, file_name = result.download
    st.download_button(f"Download {file_name}", data, file_name=file_name, mime=MIME_TYPES[image.kind],
                       on_click="ignore", type="primary", key="download")


def main():
    st.set_page_config(page_title="sr_tf: super-resolution review", layout="wide")
    st.title("Super-resolution review")
    chosen = choose_image()
    predictor = choose_model(chosen[0].modality if chosen else None)
    st.sidebar.header("Tiling")
    tile = st.sidebar.number_input("Tile (LR pixels)", 32, 2048, inference.DEFAULT_TILE, 32)
    overlap = st.sidebar.number_input("Overlap (LR pixels)", 0, 256, inference.DEFAULT_OVERLAP, 8)
    adapt = choose_adaptation(predictor) if predictor is not None else None
    if predictor is None or chosen is None:
        return
    image, key, name = chosen
    describe(image, name)
    count = image.slices.shape[0]
    index = st.slider("Slice", 0, count - 1, count // 2, key=f"slice-{key!r}") if count > 1 else 0

    scale, tile, overlap = predictor.scale, int(tile), int(overlap)
    result = result_for(predictor, image, key, name, [index], tile, overlap, adapt)
    if result is None:
        return
    if result.adaptation is not None:
        st.caption(f"The model was {result.adaptation.describe()}; training loss on the image's own pairs "
                   f"{result.adaptation.first_loss:.4f} on the first step, {result.adaptation.last_loss:.4f} "
                   "on the last.")
    lr, output = image.slices[index], result.upscaled[0]
    if result.bicubic is None:
        result.bicubic = display.bicubic(lr, scale)
        degradation = (predictor.config or {}).get("degradation", "bicubic")
        result.consistency = {"model": display.consistency(lr, output, scale, degradation),
                              "bicubic": display.consistency(lr, result.bicubic, scale, degradation)}
    box, window = display_controls(image)
    show_panels(image.window(index), lr, result.bicubic, output, scale, box, window, predictor)
    left, right = st.columns([1, 2])
    show_difference(result.bicubic, output, scale, box, image, image.window(index), left)
    show_metrics(result, tile, right)
    if result.uncertainty is not None:
        show_uncertainty(output, result.uncertainty[0], scale, box, image, image.window(index))

    if count > 1 and st.checkbox(f"Download all {count} slices (upscales the whole volume)"):
        result = result_for(predictor, image, key, name, None, tile, overlap, adapt)
    if result is not None:
        offer_download(result, image, predictor, name)


main()
