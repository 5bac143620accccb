"""Parameters, FLOPs and CPU latency of every model at scales 2, 4 and 8.

    python -m bench.models                # writes the "models" section of docs/BENCHMARKS.md

Parameters are trainable weights (batch-norm running statistics left out, as PyTorch's
``parameters()`` counts). FLOPs are counted by TensorFlow's profiler on the graph of a
concrete function for one ``--size`` x ``--size`` input (a multiply-add is 2 FLOPs;
convolutions, matmuls and element-wise ops count, data movement such as depth_to_space
does not) and reported per output megapixel. Latency is the median wall time of batch-1
inference calls of a ``tf.function`` traced for that input, after one warm-up call:
at least ``--min_runs`` runs, more while the configuration's ``--budget`` seconds last.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.report import machine, update_section  # noqa: E402
from sr_tf import models  # noqa: E402

SCALES = (2, 4, 8)


def count_flops(infer, shape):
    graph = infer.get_concrete_function(tf.TensorSpec(shape, tf.float32)).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(graph=graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op", options=options)
    return profile.total_float_ops


def latency(infer, image, min_runs, budget):
    infer(image).numpy()  # trace and warm up
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < budget:
        begin = time.perf_counter()
        infer(image).numpy()
        times.append(time.perf_counter() - begin)
    return statistics.median(times), len(times)


def measure(name, scale, size, min_runs, budget):
    model = models.build(name, scale=scale)
    params = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    infer = tf.function(lambda x: model(x, training=False))
    flops = count_flops(infer, (1, size, size, 1))
    image = tf.random.uniform((1, size, size, 1), seed=0)
    seconds, runs = latency(infer, image, min_runs, budget)
    output_mp = (size * scale) ** 2 / 1e6
    return dict(name=name, scale=scale, params=params, gflops_per_mp=flops / 1e9 / output_mp, ms=seconds * 1e3, runs=runs, output_mp=output_mp)


def markdown(rows, size):
    lines = [
        "## Models",
        "",
        f"Batch-1 inference on a {size}x{size} single-channel input, default (published) "
        f"configurations; {machine()}, TensorFlow {tf.__version__}. Written by `python -m bench.models`.",
        "",
        "| model | scale | parameters | GFLOPs / output MP | latency (ms) | output MP/s | runs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | x{r['scale']} | {r['params']:,} | {r['gflops_per_mp']:.1f} | {r['ms']:,.0f} | "
            f"{r['output_mp'] / r['ms'] * 1e3:.2f} | {r['runs']} |"
        )
    lines += [
        "",
        "Parameters: trainable weights (batch-norm running statistics excluded). FLOPs: "
        "TensorFlow profiler on the traced graph, a multiply-add counted as 2. Latency: "
        "median wall time after a warm-up call; the machine is shared, so treat it as indicative.",
    ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="input height and width")
    parser.add_argument("--min_runs", type=int, default=3, help="timed runs at least, per configuration")
    parser.add_argument("--budget", type=float, default=15.0, help="seconds of timed runs per configuration")
    parser.add_argument("--models", nargs="*", default=list(models.NAMES), choices=models.NAMES)
    parser.add_argument("--no_write", action="store_true", help="print only, leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()

    rows = []
    for name in args.models:
        for scale in SCALES:
            row = measure(name, scale, args.size, args.min_runs, args.budget)
            print(f"{name:15s} x{scale}  {row['params']:>10,} params  {row['gflops_per_mp']:7.1f} GFLOPs/MP  {row['ms']:9.0f} ms  ({row['runs']} runs)", flush=True)
            rows.append(row)
    table = markdown(rows, args.size)
    print(table)
    if not args.no_write:
        update_section("models", table)


if __name__ == "__main__":
    main()
