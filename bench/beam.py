"""Conversion speed of the Beam runner against the local runner, two workers each.

    python -m bench.beam [--repeats=3] [--copies=8] [--shard_size_mb=8]

Converts eight copies of the embedded sample set with ``--runner=local --workers=2`` and
with ``--runner=beam --workers=2`` (Beam's FnApiRunner, two worker processes on this
machine), alternating, and prints the median slices per second of each and their ratio;
the figures go to docs/BENCHMARKS.md. Each run starts its workers afresh, as a command
line does. A Beam worker converts one shard plan at a time (consecutive files of about
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
    from sr_tf.conversion_beam import plan_shards
    from sr_tf.conversion import plan_tasks
    from sr_tf.io import samples

    started = time.perf_counter()
    paths = samples.sample_paths()
    runners = ("local", "beam")
    with tempfile.TemporaryDirectory() as folder:
        files = replicate(paths, FLAGS.copies, folder)
        plans = len(plan_shards(plan_tasks(files)[0], FLAGS.shard_size_mb))
        convert_once(2, paths, samples.SAMPLE_SPLITS)  # warm-up: imports, file cache
        rates = {runner: [] for runner in runners}
        for _ in range(FLAGS.repeats):
            for runner in runners:
                slices, elapsed = convert_once(2, files, samples.SAMPLE_SPLITS, runner=runner,
                                               shard_size_mb=FLAGS.shard_size_mb)
                rates[runner].append(slices / elapsed)
                print(f"{runner}: {slices} slices in {elapsed:.1f} s, {slices / elapsed:.1f} slices/s")
    local, beam = (statistics.median(rates[runner]) for runner in runners)
    print(f"median: local {local:.1f} slices/s, beam {beam:.1f} slices/s, ratio beam/local {beam / local:.2f}")
    runs = ", ".join(f"{runner} " + " / ".join(f"{r:.0f}" for r in rates[runner]) for runner in runners)
    update_section(
        "beam",
        f"""## data_prep on Beam: `--runner=beam` against `--runner=local`, two workers each

`python -m bench.beam` on {machine()} ({cpu_model()}); {FLAGS.copies} copies of the sample set
({len(files)} files, {slices} slices), `--shard_size_mb={FLAGS.shard_size_mb:g}` ({plans} shard plans),
median of {FLAGS.repeats} alternating runs in one process, whole run {(time.perf_counter() - started) / 60:.1f} min.
**The CPU was shared with other work during the run**, so the figures are indicative only;
re-measure on a quiet machine.

| runner | slices/s | ratio to local |
|---|---:|---:|
| `--runner=local --workers=2` | {local:.1f} | 1.00 |
| `--runner=beam --workers=2` (FnApiRunner, `direct_running_mode=multi_processing`) | {beam:.1f} | {beam / local:.2f} |

Each run: {runs} slices/s. A Beam run starts two SDK worker processes that each import
TensorFlow and write their own shards; the local runner's two reader processes import no
TensorFlow and the parent writes every shard. On a data set of this size the start-up is a
large part of a Beam run; the Beam runner is for data sets that one machine's processes
(and one writer) cannot convert in reasonable time.
""",
    )


if __name__ == "__main__":
    app.run(main)
