"""Conversion speed of the Beam runner against the local runner, two workers each (and one).

    python -m bench.beam [--repeats=3] [--copies=8] [--shard_size_mb=8]

Converts eight copies of the embedded sample set with ``--runner=local --workers=2`` and
with ``--runner=beam --workers=2`` (Beam's FnApiRunner, two worker processes on this
machine), then both with one worker (Beam's in the driver's process), alternating, and
prints the median slices per second of each and their ratios; the figures go to
docs/BENCHMARKS.md. Each run starts its workers afresh, as a command line does. A Beam worker converts one shard plan at a time (consecutive files of about
``--shard_size_mb`` of input), so the shard size is set to give a few plans per worker.
"""

import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from bench.data_prep import convert_once, replicate  # noqa: E402
from bench.report import cpu_model, machine, update_section  # noqa: E402

FLAGS = flags.FLAGS  # --repeats and --copies: bench.data_prep's flags
flags.DEFINE_float("shard_size_mb", 8.0, "Shard size of both runners (the Beam runner's unit of work).")


def main(argv):
    del argv
    from sr_tf.conversion import plan_tasks
    from sr_tf.conversion_beam import plan_shards
    from sr_tf.io import samples

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    paths = samples.sample_paths()
    configurations = [(runner, workers) for workers in (2, 1) for runner in ("local", "beam")]
    with tempfile.TemporaryDirectory() as folder:
        files = replicate(paths, FLAGS.copies, folder)
        plans = len(plan_shards(plan_tasks(files)[0], FLAGS.shard_size_mb))
        convert_once(2, paths, samples.SAMPLE_SPLITS)  # warm-up: imports, file cache
        rates = {configuration: [] for configuration in configurations}
        for _ in range(FLAGS.repeats):
            for runner, workers in configurations:
                slices, elapsed = convert_once(workers, files, samples.SAMPLE_SPLITS, runner=runner,
                                               shard_size_mb=FLAGS.shard_size_mb)
                rates[runner, workers].append(slices / elapsed)
                print(f"{runner}, workers={workers}: {slices} slices in {elapsed:.1f} s, "
                      f"{slices / elapsed:.1f} slices/s", flush=True)
    median = {configuration: statistics.median(rates[configuration]) for configuration in configurations}
    for workers in (2, 1):
        local, beam = median["local", workers], median["beam", workers]
        print(f"workers={workers}: local {local:.1f} slices/s, beam {beam:.1f} slices/s, ratio {beam / local:.2f}")
    rows = "\n".join(
        f"| {workers} ({how}) | {median['local', workers]:.1f} | {median['beam', workers]:.1f} | "
        f"{median['beam', workers] / median['local', workers]:.2f} |"
        for workers, how in ((2, "Beam: two SDK worker processes, `direct_running_mode=multi_processing`"),
                             (1, "Beam: in the driver's process, `in_memory`"))
    )
    runs = "; ".join(
        f"{runner} x{workers}: " + ", ".join(f"{r:.0f}" for r in rates[runner, workers])
        for runner, workers in configurations
    )
    update_section(
        "beam",
        f"""## data_prep on Beam: `--runner=beam` against `--runner=local`

`python -m bench.beam` on {machine()} ({cpu_model()}); {FLAGS.copies} copies of the sample set
({len(files)} files, {slices} slices), `--shard_size_mb={FLAGS.shard_size_mb:g}` ({plans} shard plans),
Beam's FnApiRunner; median of {FLAGS.repeats} alternating runs in one process, whole run
{(time.perf_counter() - started) / 60:.1f} min; load average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f}
after (above the 2 cores: shared with other work, the figures indicative only).

| `--workers` | `--runner=local` slices/s | `--runner=beam` slices/s | ratio beam/local |
|---|---:|---:|---:|
{rows}

Every run, slices/s: {runs}.

Each Beam run with two workers starts two SDK worker processes that import Beam and
TensorFlow before they convert anything (about ten seconds on this machine), while the
local runner's reader processes import no TensorFlow; with one worker, in the driver's
process, the Beam runner converts about as fast as the local one. On a data set this small
the start-up is most of a Beam run: the Beam runner is for data sets that one machine's
processes, and one writer, cannot convert in reasonable time.
""",
    )


if __name__ == "__main__":
    app.run(main)
