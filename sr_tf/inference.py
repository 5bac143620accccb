"""Run a trained generator, whatever form it was saved in, on images of any size.

    predictor = load_predictor("runs/swift_srgan_x4")          # or .keras, SavedModel, .tflite
    sr = tiled_predict(predictor, lr)                        # (H, W, 1) -> (4H, 4W, 1), tiled

A :class:`Predictor` maps float32 LR batches (N, h, w, 1) in [0, 1] to (N, s*h, s*w, 1).
It knows its scale (from the model, its model card, or one probe call) and, where the
model came with one, the training configuration (``config.json`` of its run, or the
``model_card.json`` that ``export.py`` writes beside its files).

Large images are cut into overlapping tiles whose outputs are stitched from their
interiors only, so memory is bounded by the tile batch and the output array, and the
result equals whole-image inference wherever the model's receptive field fits in the
overlap. Tile origins are multiples of ``align`` LR pixels (but the last, flush with the
image edge), so models with strided layers (the VQ autoencoder) see the pixel grid of
the whole image.
"""

import json
import os

import numpy as np

MODEL_CARD = "model_card.json"
# Default tiling (LR pixels) of every front end. The overlap puts each seam 20 pixels from
# a tile border: for the sample-trained Swift-SRGAN x4 (receptive-field radius 39) tiled
# output then differs from whole-image output by at most 3e-5 on a 1024x1024 input,
# against 9e-4 with an overlap of 32 and 0.04 with 16. One tile of 512 per call holds as
# many pixels as four of 256 but runs less of the image twice: a 1024x1024 input is 9
# balanced tiles of 368 (1.16x its pixels) instead of 25 of 256 (1.56x), and the TFLite
# Swift-SRGAN x4 runs it 1.36x as fast on a 2-core CPU.
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 40
DEFAULT_BATCH = 1
# Tile origins are multiples of this (the VQ autoencoder's encoder stride).
TILE_ALIGN = 2


class Predictor:
    """A loaded model. ``predict(batch)`` runs it; subclasses differ in the runtime.

    ``projection`` is the data-consistency projection (``sr_tf.consistency.Projection``)
    its outputs already include (an exported graph that bakes it in, or
    :class:`ProjectedPredictor`), None when they do not.
    """

    kind = "keras"
    projection = None

    def __init__(self, path, name, config=None, card=None):
        self.path = path
        self.name = name
        self.config = config  # the training configuration, when known
        self.card = card  # the export model card, when there is one
        self._scale = None

    @property
    def scale(self):
        if self._scale is None:
            known = (self.card or {}).get("model_scale") or getattr(self, "_model_scale", None)
            if known is None:
                probe = self.predict(np.zeros((1, 16, 16, 1), np.float32))
                known = probe.shape[1] // 16
            self._scale = int(known)
        return self._scale

    def predict(self, batch):
        raise NotImplementedError

    def __call__(self, batch):
        return self.predict(batch)


class KerasPredictor(Predictor):
    kind = "keras"

    def __init__(self, model, path, name, config=None, card=None):
        import tensorflow as tf

        super().__init__(path, name, config, card)
        self.model = model
        self._model_scale = getattr(model, "scale", None)
        # One trace for every size: the batch, height and width are left free.
        self._run = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def predict(self, batch):
        out = self._run(np.asarray(batch, np.float32))
        return np.asarray(out, np.float32)


class SavedModelPredictor(Predictor):
    kind = "saved_model"

    def __init__(self, path, name, config=None, card=None):
        import tensorflow as tf

        super().__init__(path, name, config, card)
        self.projection = _baked_projection(card, "saved_model")
        self.module = tf.saved_model.load(path)
        signature = self.module.signatures.get("serving_default")
        if signature is None:
            raise ValueError(f"{path}: the SavedModel has no serving_default signature")
        self._signature = signature
        self._input = next(iter(signature.structured_input_signature[1]))

    def predict(self, batch):
        import tensorflow as tf

        outputs = self._signature(**{self._input: tf.constant(np.asarray(batch, np.float32))})
        return np.asarray(next(iter(outputs.values())), np.float32)


class TFLitePredictor(Predictor):
    """The LiteRT interpreter, resized to each input shape (kept while shapes repeat).

    Quantised inputs/outputs (full-integer models built with integer I/O) are mapped
    through their scale and zero point, so callers always pass and get [0, 1] floats.
    """

    kind = "tflite"

    def __init__(self, path, name, config=None, card=None, threads=None):
        from ai_edge_litert.interpreter import Interpreter

        super().__init__(path, name, config, card)
        form = os.path.splitext(os.path.basename(path))[0].removeprefix("model_")
        self.projection = _baked_projection(card, form)
        try:
            self.interpreter = Interpreter(model_path=path, num_threads=threads or os.cpu_count())
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"{path}: not a TFLite model the LiteRT runtime can load ({exc})") from exc
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self._shape = None

    def _resize(self, shape):
        if self._shape != shape:
            self.interpreter.resize_tensor_input(self._input["index"], list(shape), strict=False)
            self.interpreter.allocate_tensors()
            self._input = self.interpreter.get_input_details()[0]
            self._output = self.interpreter.get_output_details()[0]
            self._shape = shape

    def predict(self, batch):
        batch = np.asarray(batch, np.float32)
        self._resize(tuple(batch.shape))
        self.interpreter.set_tensor(self._input["index"], _quantize(batch, self._input))
        self.interpreter.invoke()
        return _dequantize(self.interpreter.get_tensor(self._output["index"]), self._output)


class ProjectedPredictor(Predictor):
    """Another predictor followed by data-consistency projection of every output batch
    against its own input batch (``sr_tf.consistency``); tiled inference projects each
    tile against its LR tile, the way an exported graph with the projection baked in runs."""

    def __init__(self, inner, projection):
        import tensorflow as tf

        super().__init__(inner.path, inner.name, inner.config, inner.card)
        self.inner, self.projection, self.kind = inner, projection, inner.kind
        self._scale = inner.scale
        self._project = tf.function(projection, reduce_retracing=True)

    def predict(self, batch):
        batch = np.asarray(batch, np.float32)
        out = np.asarray(self.inner.predict(batch), np.float32)
        projected = np.asarray(self._project(batch, out[..., :1]), np.float32)
        # Channels after the first (an ensemble's spread) are carried as they are.
        return projected if out.shape[-1] == 1 else np.concatenate([projected, out[..., 1:]], axis=-1)


def chain(predictor):
    """``predictor`` and every predictor it wraps (projection, ensemble), outermost first;
    the last runs the model itself."""
    links = [predictor]
    while getattr(links[-1], "inner", None) is not None:
        links.append(links[-1].inner)
    return links


def innermost(predictor):
    """The predictor that runs the model itself, under any wrappers (projection, ensemble)."""
    return chain(predictor)[-1]


def replace_innermost(predictor, model_predictor):
    """``predictor`` with the same wrappers around ``model_predictor`` instead of its own
    innermost predictor (an adapted copy of the model, say)."""
    import copy

    if getattr(predictor, "inner", None) is None:
        return model_predictor
    wrapper = copy.copy(predictor)
    wrapper.inner = replace_innermost(predictor.inner, model_predictor)
    return wrapper


def adapted(predictor, slices, degradation=None, **keywords):
    """``predictor`` with its model replaced by a copy adapted to ``slices`` (the LR
    input, ``sr_tf.adaptation.adapt`` with ``keywords``: steps, seconds, seed, ...), the
    report on the copy's ``adaptation``; the same wrappers around it. AdaptationError
    when the model is not a Keras model or cannot be adapted."""
    from sr_tf import adaptation

    base = innermost(predictor)
    if not isinstance(base, KerasPredictor):
        raise adaptation.AdaptationError("per-scan adaptation needs a Keras model (.keras, a run folder or a zoo "
                                         f"name); {base.path} is a {base.kind} model")
    model, report = adaptation.adapt(base.model, slices, degradation=degradation or degradation_of(base), **keywords)
    copy = KerasPredictor(model, base.path, base.name, base.config, base.card)
    copy.adaptation = report
    return replace_innermost(predictor, copy)


def describe(predictor):
    """What ``predictor`` runs, in words, for a DerivationDescription or a report: the
    model, then any adaptation, self-ensemble and projection, in the order they run."""
    model = innermost(predictor)
    parts = [f"the model {model.name}"]
    if getattr(model, "adaptation", None) is not None:
        parts.append(model.adaptation.describe())
    for wrapper in reversed(chain(predictor)[:-1]):  # innermost first: the order they run in
        if getattr(wrapper, "ensemble_description", None):
            parts.append(wrapper.ensemble_description)
    if predictor.projection is not None:
        parts.append(f"then {predictor.projection.describe()}")
    return ", ".join(parts)


def _baked_projection(card, form):
    """The projection the exported ``form`` (``saved_model``, ``float16``, ...) includes,
    as its model card records it; None when it includes none."""
    from sr_tf import consistency

    entry = (card or {}).get("consistency") or {}
    if form not in entry.get("forms", [form]):
        return None
    return consistency.Projection.from_card(entry)


def degradation_of(predictor):
    """The degradation ``predictor``'s model was trained for, as its training config or
    model card says (bicubic, or bilinear_artifacts for a same-size model, when neither does)."""
    known = {**(predictor.card or {}), **(predictor.config or {})}
    return known.get("degradation") or ("bicubic" if predictor.scale > 1 else "bilinear_artifacts")


def projection_for(predictor, iterations=None, step=None):
    """The ``sr_tf.consistency.Projection`` that suits ``predictor``'s degradation and
    scale (its training config or model card; bicubic at the model's scale when neither
    says). ConsistencyError when the model's scale does not fit that degradation."""
    from sr_tf import consistency
    from sr_tf.data import degrade

    known = {**(predictor.card or {}), **(predictor.config or {})}
    degradation = degradation_of(predictor)
    scale = int(known.get("scale") or (predictor.scale if predictor.scale > 1 else 4))
    if degradation == "self_supervised":  # learns one bicubic step from one level to the next
        degradation = "bicubic"
    if degrade.model_scale(degradation, scale) != predictor.scale:
        raise consistency.ConsistencyError(
            f"{predictor.name}: cannot project: degradation {degradation!r} at x{scale} needs a "
            f"x{degrade.model_scale(degradation, scale)} model, this one is x{predictor.scale}")
    return consistency.Projection(
        scale, degradation, consistency.DEFAULT_ITERATIONS if iterations is None else iterations,
        consistency.DEFAULT_STEP if step is None else step)


def with_consistency(predictor, mode, iterations=None, step=None):
    """``predictor`` with data-consistency projection after it (``mode`` "project") or
    as it is ("none"). A predictor whose graph already includes the projection is
    returned as it is for "project" and refused for "none" (ConsistencyError)."""
    from sr_tf import consistency

    consistency.check(mode, consistency.DEFAULT_ITERATIONS if iterations is None else iterations,
                      consistency.DEFAULT_STEP if step is None else step)
    if predictor.projection is not None:
        if mode == "none":
            raise consistency.ConsistencyError(
                f"--consistency=none: {predictor.path} already includes {predictor.projection.describe()} "
                "in its graph; export the model with --consistency=none for one without")
        return predictor
    if mode == "none":
        return predictor
    return ProjectedPredictor(predictor, projection_for(predictor, iterations, step))


def _quantize(values, detail):
    dtype = detail["dtype"]
    if dtype == np.float32:
        return values
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(values / scale + zero), info.min, info.max).astype(dtype)


def _dequantize(values, detail):
    if values.dtype == np.float32:
        return values.copy()
    scale, zero = detail["quantization"]
    return ((values.astype(np.float32) - zero) * scale).astype(np.float32)


def _read_json(path):
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return None


def _config_near(folder):
    """The training config and model card found in ``folder`` (either may be None)."""
    card = _read_json(os.path.join(folder, MODEL_CARD))
    config = _read_json(os.path.join(folder, "config.json"))
    if config is None and card is not None:
        config = card.get("training")
    return config, card


def load_predictor(path, threads=None):
    """A :class:`Predictor` for a run folder, a ``.keras`` file, a SavedModel folder, an
    export folder (its SavedModel), a ``.tflite`` file or a zoo name (``sr_tf.zoo``:
    its folder's ``generator.keras``). ValueError naming the path and the reason when it
    is none of those or cannot be loaded."""
    from sr_tf import zoo

    path = zoo.resolve(os.fspath(path))
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such model file or folder")
    if os.path.isdir(path):
        config, card = _config_near(path)
        if os.path.isfile(os.path.join(path, "generator.keras")):
            return _load_keras(os.path.join(path, "generator.keras"), config, card)
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            return SavedModelPredictor(path, _name(path, card), config, card)
        if os.path.isfile(os.path.join(path, "saved_model", "saved_model.pb")):
            return SavedModelPredictor(os.path.join(path, "saved_model"), _name(path, card), config, card)
        raise ValueError(
            f"{path}: not a model folder (expected generator.keras from a training run, or a SavedModel)"
        )
    config, card = _config_near(os.path.dirname(os.path.abspath(path)))
    if path.endswith(".keras"):
        return _load_keras(path, config, card)
    if path.endswith(".tflite"):
        return TFLitePredictor(path, _name(path, card), config, card, threads=threads)
    raise ValueError(f"{path}: unknown model format (expected a run folder, .keras, a SavedModel or .tflite)")


def _name(path, card):
    if card and card.get("name"):
        return card["name"]
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def _load_keras(path, config, card):
    import keras

    import zipfile

    import sr_tf.models  # noqa: F401  (registers the model classes for deserialisation)

    if not zipfile.is_zipfile(path):  # Keras says "File not found" for a truncated archive
        raise ValueError(f"{path}: not a valid .keras archive (truncated, or not a Keras model file)")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # zip, JSON and deserialisation errors of every kind
        raise ValueError(f"{path}: cannot load the Keras model ({type(exc).__name__}: {exc})") from exc
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    name = (card or {}).get("name") or (folder if os.path.basename(path) == "generator.keras" else None)
    return KerasPredictor(model, path, name or _name(path, None), config, card)


# ----------------------------------------------------------------------------- tiling


def tile_origins(size, tile, overlap, align=1):
    """Start offsets of tiles of ``tile`` pixels covering ``size`` with at least
    ``overlap`` pixels shared between neighbours, each a multiple of ``align`` but the
    last, which ends flush with the image. One tile when it fits."""
    if tile >= size:
        return [0]
    stride = max(align, (tile - overlap) // align * align)
    return list(range(0, size - tile, stride)) + [size - tile]


def balanced_tile(size, tile, overlap, align=1):
    """The smallest tile, at most ``tile`` and a multiple of ``align`` where one fits,
    that covers ``size`` in as few tiles as ``tile`` does (``tile_origins``): the tiles
    share the slack instead of the last one overlapping its neighbour far more than
    ``overlap``, so less of the image runs twice. 1024 LR pixels in tiles of at most 256
    overlapping by 40: five tiles of 238."""
    if tile >= size:
        return size
    count = len(tile_origins(size, tile, overlap, align))
    smallest = max(2 * overlap + 1, overlap + -(-(size - overlap) // count))
    for candidate in range(-(-smallest // align) * align, tile, align):  # a multiple of align, as origins are
        if len(tile_origins(size, candidate, overlap, align)) <= count:
            return candidate
    return tile


def tile_layout(size, tile, overlap, align=TILE_ALIGN):
    """(tile size, tile origins) of one axis of ``size`` pixels as ``tiled_predict`` cuts it."""
    tile = balanced_tile(size, tile, overlap, align)
    return tile, tile_origins(size, tile, overlap, align)


def _keep_range(origins, index, tile, size):
    """The part [lo, hi) of tile ``index`` (input pixels) that it contributes: the seams
    sit half-way through each overlap, so every pixel comes from the tile whose border
    is furthest from it."""
    start = origins[index]
    lo = start if index == 0 else (start + origins[index - 1] + tile) // 2
    hi = min(start + tile, size) if index == len(origins) - 1 else (origins[index + 1] + start + tile) // 2
    return lo, hi


def check_tiling(tile, overlap, batch_size=1):
    """ValueError unless ``tile`` >= 8 LR pixels, 0 <= ``overlap`` < tile // 2 and ``batch_size`` >= 1."""
    if tile < 8 or not 0 <= overlap < tile // 2:
        raise ValueError(f"tile must be at least 8 and overlap in [0, {tile // 2}); got tile={tile}, overlap={overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def tiled_predict(predictor, image, tile=DEFAULT_TILE, overlap=DEFAULT_OVERLAP, batch_size=DEFAULT_BATCH,
                  align=TILE_ALIGN, progress=None):
    """Super-resolve one image (H, W) or (H, W, 1) with overlapping tiles.

    ``tile`` (the largest tile) and ``overlap`` are in LR pixels; each axis is cut into
    as few tiles as ``tile`` allows, of equal size (``balanced_tile``). Tiles are run
    ``batch_size`` at a time.
    The output is (s*H, s*W, C) float32 (s = ``predictor.scale``; C the channels the
    predictor returns: 1, or 2 for an ensemble with its spread), filled in place, so
    peak memory is the output plus one batch of tiles. ``progress`` is called with
    (tiles done, tiles total) after each batch.
    """
    image = np.asarray(image, np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] != 1:
        raise ValueError(f"expected a single-channel image (H, W) or (H, W, 1), got shape {image.shape}")
    check_tiling(tile, overlap, batch_size)
    height, width = image.shape[:2]
    scale = predictor.scale
    (th, rows), (tw, cols) = tile_layout(height, tile, overlap, align), tile_layout(width, tile, overlap, align)
    output = None
    jobs = [(r, c) for r in range(len(rows)) for c in range(len(cols))]
    for first in range(0, len(jobs), batch_size):
        chunk = jobs[first:first + batch_size]
        batch = np.stack([image[rows[r]:rows[r] + th, cols[c]:cols[c] + tw] for r, c in chunk])
        result = predictor.predict(batch)
        if output is None:
            output = np.empty((height * scale, width * scale, result.shape[-1]), np.float32)
        for (r, c), out in zip(chunk, result):
            y0, y1 = _keep_range(rows, r, th, height)
            x0, x1 = _keep_range(cols, c, tw, width)
            oy, ox = (y0 - rows[r]) * scale, (x0 - cols[c]) * scale
            output[y0 * scale:y1 * scale, x0 * scale:x1 * scale] = out[oy:oy + (y1 - y0) * scale,
                                                                       ox:ox + (x1 - x0) * scale]
        if progress is not None:
            progress(min(first + batch_size, len(jobs)), len(jobs))
    return output
