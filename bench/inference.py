"""Output megapixels per second of every exported form of Swift-SRGAN x4 on this CPU.

    python -m bench.inference                 # writes the "inference" section of docs/BENCHMARKS.md
    python -m bench.inference --repeats 1 --no_write

Swift-SRGAN x4 in its published configuration (64 filters, 16 blocks, 1 channel), randomly
initialised (speed does not depend on the weights), is saved as ``.keras`` and exported
by ``sr_tf.export`` (the int8 model calibrated on ``--data``, the embedded sample set by
default). Every form runs through the ``sr_tf.inference`` predictors that ``evaluate.py``
and ``upscale.py`` use: the Keras model, the SavedModel and the four TFLite models on the
LiteRT interpreter (XNNPACK, ``--threads`` threads). The 512x512 LR input runs as one
image; the 1024x1024 input through ``tiled_predict`` (``--tile``, ``--overlap``,
``--batch`` tiles per call), which bounds memory. Figures are the median of up to
``--repeats`` timed runs after a warm-up (a whole run; one batch of tiles when tiled),
fewer when a configuration's runs exceed ``--budget`` seconds. Parity is the PSNR of each
form's 512x512 output against the Keras model's (the export's targets: 50 dB float,
35 dB int8).

Diagnostic rows (smallest size only) show what the model's deployable form
(``model.deployable()``, what the TFLite models are converted from) gains: the same
float32 model converted with the tail after the last pixel shuffle (only the 9x9
depthwise kernels split: ``deployable(tail_before_shuffle=False)``), and
converted from the model's own graph (nothing changed); and TFLite's own kernels without
XNNPACK.
"""

import argparse
import importlib.metadata
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.models import count_flops  # noqa: E402
from bench.report import machine, update_section  # noqa: E402
from sr_tf import export, inference, models  # noqa: E402

SCALE = 4
TARGET_MP_S = 2.0
BANDED_ONLY = "TFLite float32, tail after the shuffle"
UNCHANGED = "TFLite float32, model graph unchanged"
PYTORCH_REFERENCE = "the published PyTorch Swift-SRGAN: 0.28 output MP/s from 256x256 on this CPU"


class BuiltinKernels(inference.TFLitePredictor):
    """A TFLite model on TFLite's own kernels, without the default XNNPACK delegate."""

    kind = "tflite_builtin"

    def __init__(self, path, threads):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        super().__init__(path, "builtin", threads=threads)
        self.interpreter = Interpreter(model_path=path, num_threads=threads,
                                       experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]


def lr_image(size, data):
    """A realistic LR input: the largest training image of ``data`` (the chest radiograph
    of the sample set) resized to ``size`` x ``size``; smooth noise without records."""
    from sr_tf.data import pipeline

    try:
        largest = max(pipeline.make_eval_dataset(data, "train"), key=lambda e: int(e["height"]) * int(e["width"]))
        image = largest["image"]
    except (ValueError, OSError):  # no records: deterministic smooth noise
        image = tf.random.stateless_uniform((32, 32, 1), (0, 0))
    return tf.image.resize(image, (size, size), "bicubic", antialias=True).numpy().clip(0, 1)


def timed(run, repeats, budget, warm_up=None):
    """(median seconds, output, every run's seconds) of ``run()`` after one ``warm_up()``
    (default: a run)."""
    output = (warm_up or run)()
    times, start = [], time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - start < budget):
        begin = time.perf_counter()
        output = run()
        times.append(time.perf_counter() - begin)
    return statistics.median(times), output, times


def forms(keras_file, folder, threads, variants):
    """(label, predictor factory, export report key) of every form of the export."""
    rows = [("Keras (.keras, TF)", lambda: inference.load_predictor(keras_file), None),
            ("SavedModel (TF)", lambda: inference.load_predictor(folder), "saved_model")]
    for variant in variants:
        path = os.path.join(folder, export.tflite_name(variant))
        rows.append((f"TFLite {variant}", lambda path=path: inference.TFLitePredictor(path, "tflite", threads=threads),
                     variant))
    return rows


def diagnostics(model, folder, work, threads):
    """Forms shown at the smallest size only: float32 converted from less rearranged
    graphs, float32 and int8 without XNNPACK, int8 on one thread."""
    unsplit = os.path.join(work, "unsplit_float32.tflite")
    with open(unsplit, "wb") as f:
        f.write(export.convert(os.path.join(folder, export.SAVED_MODEL_DIR), "float32"))
    banded_source, banded = os.path.join(work, "banded_only"), os.path.join(work, "banded_float32.tflite")
    function, _ = model.deployable(tail_before_shuffle=False)
    export.save_saved_model(model, banded_source, function)
    with open(banded, "wb") as f:
        f.write(export.convert(banded_source, "float32"))
    float32 = os.path.join(folder, export.tflite_name("float32"))
    int8 = os.path.join(folder, export.tflite_name("int8"))
    rows = [(BANDED_ONLY, lambda: inference.TFLitePredictor(banded, "b", threads=threads)),
            (UNCHANGED, lambda: inference.TFLitePredictor(unsplit, "u", threads=threads)),
            ("TFLite float32, no XNNPACK", lambda: BuiltinKernels(float32, threads))]
    if os.path.isfile(int8):
        rows += [("TFLite int8, no XNNPACK", lambda: BuiltinKernels(int8, threads)),
                 ("TFLite int8, 1 thread", lambda: inference.TFLitePredictor(int8, "t1", threads=1))]
    return rows


def tiled_as(size, args):
    """How ``tiled_predict`` cuts a size x size image, e.g. "9 tiles of 368"."""
    tile, origins = inference.tile_layout(size, args.tile, args.overlap)
    return f"{len(origins) ** 2} tiles of {tile}"


def measure(predictor, image, size, args):
    """(median seconds, output, every run's seconds) for one LR image: whole, or tiled
    from ``--tiled_from``."""
    if size < args.tiled_from:
        batch = image[None]
        return timed(lambda: predictor.predict(batch)[0], args.repeats, args.budget)
    # Warm-up: one batch of tiles, the shape every call of the tiled run has.
    tile = inference.tile_layout(size, args.tile, args.overlap)[0]
    tiles = np.zeros((args.batch, tile, tile, 1), np.float32)
    return timed(lambda: inference.tiled_predict(predictor, image, args.tile, args.overlap, args.batch),
                 args.repeats, args.budget, warm_up=lambda: predictor.predict(tiles))


def findings(rows, size, gflops_per_mp):
    """What the diagnostic rows and the FLOP count say, as markdown bullets."""
    speed = {r["label"]: r["sizes"][size]["mp_s"] for r in rows if size in r["sizes"]}
    comparisons = [
        ("TFLite float32", BANDED_ONLY, "Running the last PReLU and the 9x9 tail before the final pixel shuffle, the tail "
         "as a 1x5 and a 5x1 convolution (`SRResNet.deployable`)"),
        (BANDED_ONLY, UNCHANGED, "Splitting the 9x9 depthwise convolutions into "
         "bands of kernel rows (XNNPACK's fast path takes depthwise kernels of up to 25 taps; how much slower "
         "larger ones run depends on the CPU: many times on some, hardly on others)"),
        ("TFLite float32", "TFLite float32, no XNNPACK", "XNNPACK over TFLite's own kernels"),
        ("TFLite int8", "TFLite int8, no XNNPACK", "XNNPACK over TFLite's own kernels, int8"),
        ("TFLite int8", "TFLite int8, 1 thread", f"{os.cpu_count()} interpreter threads over 1"),
    ]
    lines = [f"- {what}: {speed[fast] / speed[slow]:.1f}x the output MP/s at {size}x{size}."
             for fast, slow, what in comparisons if fast in speed and slow in speed]
    best = max(speed.get(f"TFLite {v}", 0.0) for v in export.VARIANTS)
    lines.append(f"- At {gflops_per_mp:.0f} GFLOPs per output MP, {TARGET_MP_S:.0f} MP/s needs "
                 f"{TARGET_MP_S * gflops_per_mp:.0f} GFLOP/s sustained; the fastest TFLite form sustains "
                 f"{best * gflops_per_mp:.0f} GFLOP/s at {size}x{size}.")
    return lines


def markdown(rows, args, load, params, gflops_per_mp):
    sizes = args.sizes
    lines = [
        "## Inference: Swift-SRGAN x4, every exported form",
        "",
        f"`python -m bench.inference` on {machine()}, TensorFlow {tf.__version__}, LiteRT "
        f"{importlib.metadata.version('ai-edge-litert')}, {args.threads} interpreter threads. Published "
        f"configuration (64 filters, 16 blocks, 1 channel, {params:,} parameters, {gflops_per_mp:.0f} GFLOPs per "
        "output MP), "
        "random weights; int8 calibrated on the sample set. "
        + " ".join(f"{s}x{s} LR -> {s * SCALE}x{s * SCALE} ({(s * SCALE) ** 2 / 1e6:.1f} MP)"
                   + (" whole;" if s < args.tiled_from else f" tiled as upscale.py tiles it (largest tile {args.tile}, "
                      f"overlap {args.overlap}, batch {args.batch}: {tiled_as(s, args)});") for s in sizes)
        + f" median of up to {args.repeats} runs after a warm-up (a run; one tile batch when tiled). "
        f"Load average (1 min) of the shared machine: {load[0]:.1f} before, {load[1]:.1f} after.",
        "",
        "| form | file | " + " | ".join(f"{s}² s | {s}² output MP/s" for s in sizes)
        + f" | PSNR vs Keras ({min(sizes)}²) | parity target |",
        "|---|---:|" + "---:|---:|" * len(sizes) + "---:|---|",
    ]
    for r in rows:
        cells = []
        for s in sizes:
            m = r["sizes"].get(s)
            cells += [f"{m['seconds']:.2f}", f"{m['mp_s']:.3f}"] if m else ["-", "-"]
        psnr = "-" if r["label"].startswith("Keras") else ("identical" if r["psnr"] is None else f"{r['psnr']:.1f} dB")
        target = "-" if r["target"] is None else f"{r['target']:.0f} dB: {'met' if r['meets'] else 'MISSED'}"
        size = "-" if r["bytes"] is None else f"{r['bytes'] / 1e6:.2f} MB"
        lines.append(f"| {r['label']} | {size} | " + " | ".join(cells) + f" | {psnr} | {target} |")
    ok = [r for r in rows if r["meets"] and r["target"] is not None]
    lines.append("")
    for s in sizes:
        timed_ok = [r for r in ok if s in r["sizes"]]
        if timed_ok:
            best = max(timed_ok, key=lambda r: r["sizes"][s]["mp_s"])
            verdict = "meets" if best["sizes"][s]["mp_s"] >= TARGET_MP_S else "misses"
            runs = [(s * SCALE) ** 2 / 1e6 / t for t in best["sizes"][s]["runs"]]
            lines.append(f"- From {s}x{s}: fastest form within its parity target is {best['label']}, "
                         f"{best['sizes'][s]['mp_s']:.2f} output MP/s (runs {min(runs):.2f}-{max(runs):.2f}); "
                         f"it {verdict} the {TARGET_MP_S:.0f} MP/s target ({PYTORCH_REFERENCE}).")
    return "\n".join(lines + findings(rows, min(sizes), gflops_per_mp))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[512, 1024], help="LR input sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs at most, per configuration")
    parser.add_argument("--budget", type=float, default=60.0, help="no further timed run after this many seconds")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="LiteRT interpreter threads")
    parser.add_argument("--tiled_from", type=int, default=1024, help="inputs this large run tiled")
    parser.add_argument("--tile", type=int, default=inference.DEFAULT_TILE, help="LR tile (default: upscale.py's)")
    parser.add_argument("--overlap", type=int, default=inference.DEFAULT_OVERLAP, help="default: upscale.py's")
    parser.add_argument("--batch", type=int, default=inference.DEFAULT_BATCH, help="tiles per predictor call (default: upscale.py's)")
    parser.add_argument("--data", default="tfrecords/samples", help="records for int8 calibration and the input")
    parser.add_argument("--no_diagnostics", action="store_true", help="leave out the diagnostic rows")
    parser.add_argument("--no_write", action="store_true", help="print only, leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    work = tempfile.mkdtemp(prefix="bench_inference_")
    try:
        keras_file = os.path.join(work, "model.keras")
        model = models.build("swift_srgan", scale=SCALE)
        model.save(keras_file)
        params = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        gflops_per_mp = count_flops(tf.function(lambda x: model(x, training=False)), (1, 64, 64, 1)) / 1e9 / (
            (64 * SCALE) ** 2 / 1e6)
        folder = os.path.join(work, "export")
        has_data = os.path.isfile(os.path.join(args.data, "manifest.json"))
        variants = export.VARIANTS if has_data else tuple(v for v in export.VARIANTS if v != "int8")
        print(f"exporting Swift-SRGAN x4 into {folder} ...", flush=True)
        report = export.export(keras_file, folder, data=args.data if has_data else None,
                               variants=variants)
        images = {s: lr_image(s, args.data) for s in args.sizes}
        candidates = [(label, make, key, args.sizes) for label, make, key in
                      forms(keras_file, folder, args.threads, variants)]
        if not args.no_diagnostics:
            candidates += [(label, make, None, [min(args.sizes)])
                           for label, make in diagnostics(model, folder, work, args.threads)]
        references, rows = {}, []
        for label, make, key, sizes in candidates:
            predictor = make()
            entry = report["variants"].get(key, {})
            row = {"label": label, "target": entry.get("target_db"), "sizes": {}, "psnr": None, "meets": None,
                   "bytes": os.path.getsize(keras_file) if label.startswith("Keras") else entry.get("bytes")}
            for size in sizes:
                seconds, output, runs = measure(predictor, images[size], size, args)
                mp = (size * SCALE) ** 2 / 1e6
                row["sizes"][size] = {"seconds": seconds, "mp_s": mp / seconds, "runs": runs}
                if label.startswith("Keras"):
                    references[size] = output
                elif size == min(args.sizes):
                    row["psnr"] = export.psnr(references[size], output)
                print(f"{label:40s} {size:5d}: {seconds:7.2f} s  {mp / seconds:6.3f} MP/s  "
                      f"(runs: {', '.join(f'{t:.2f}' for t in runs)} s)", flush=True)
            if row["target"] is not None:
                row["meets"] = row["psnr"] is None or row["psnr"] >= row["target"]
            rows.append(row)
            del predictor
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = markdown(rows, args, (load_before, os.getloadavg()[0]), params, gflops_per_mp)
    print(table)
    if not args.no_write:
        update_section("inference", table)


if __name__ == "__main__":
    main()
