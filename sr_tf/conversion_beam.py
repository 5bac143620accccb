"""The conversion as an Apache Beam pipeline: the same shards and manifest from one machine
or a cluster (``python -m data_prep --runner=beam``; docs/DESIGN.md, contract 4: atomic
shards and the manifest).

The driver does what needs the whole input (``conversion.prepare``: files, tasks, the
inputs that fail while planning) and cuts the tasks, in their order, into shard plans
(:func:`plan_shards`: runs of consecutive tasks of about ``--shard_size_mb`` of input).
The plans go into a file in the run's scratch folder; each element of the pipeline is
where one plan lies in that file, so that a million inputs do not travel inside the
pipeline's definition. A worker converts its plan's tasks (``conversion.convert_task``,
the local runner's), writes one shard for each split its records fall into, named
``<split>-<plan index>-<run id>.tfrecord`` (``shards.OpenShard``: a temporary name of its
own, renamed when complete), then the plan's summary (its shards, and per task the
failures and statistics of ``conversion.summarize_task``) to ``plan-<index>.json`` in the
scratch folder. When the pipeline has finished, the driver reads the summaries in plan
order, adds them up as the local runner does (``conversion.Tally``) and publishes the
manifest last (``shards.ShardWriter``): the same records, splits, counts, failures and
statistics as ``--runner=local``, in a manifest of the same form.

Nothing in the pipeline counts with a side input or a GroupByKey: the plans are made
before it runs, and what the manifest needs travels in files named by plan.

A runner may run a plan more than once (a retried bundle, a speculative copy). Every
attempt writes temporaries of its own, and a plan's shards are the same bytes from any
attempt, so a second rename replaces a shard with the same content and each shard is
listed once; a plan without a summary fails the conversion. What a killed attempt left
behind is removed when the manifest is published, and everything of the run when it
fails.
"""

import dataclasses
import json
import logging
import os
import uuid

from sr_tf import conversion, records
from sr_tf.io.files import is_url, join, read_json, write_json_atomic
from sr_tf.io.shards import OpenShard, ShardWriter

log = logging.getLogger(__name__)

MAX_PLANS = 100_000  # shard names hold the plan index in five digits


@dataclasses.dataclass
class ShardPlan:
    """Consecutive tasks whose records one worker writes into its shards (one per split)."""

    index: int
    tasks: list


def plan_shards(tasks, shard_size_mb):
    """Cut ``tasks`` (in order) into plans of about ``shard_size_mb`` of input files each;
    a task is never divided. The same tasks and files give the same plans."""
    limit = max(1, int(shard_size_mb * 1024 * 1024))
    plans, current, current_bytes = [], [], 0
    for task in tasks:
        task_bytes = sum(os.path.getsize(path) for path in task.paths)
        if current and current_bytes + task_bytes > limit:
            plans.append(ShardPlan(len(plans), current))
            current, current_bytes = [], 0
        current.append(task)
        current_bytes += task_bytes
    if current:
        plans.append(ShardPlan(len(plans), current))
    if len(plans) > MAX_PLANS:
        raise conversion.ConversionError(
            f"{len(plans)} shard plans, more than {MAX_PLANS}: raise --shard_size_mb (now {shard_size_mb})"
        )
    return plans


def write_plans(plans, path):
    """Write ``plans`` as JSON lines to ``path``; returns each plan's (index, offset, length)."""
    import tensorflow as tf

    lines = [
        (json.dumps({"index": plan.index, "tasks": [[task.kind, task.paths] for task in plan.tasks]}) + "\n").encode()
        for plan in plans
    ]
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(b"".join(lines))
    elements, offset = [], 0
    for plan, line in zip(plans, lines):
        elements.append((plan.index, offset, len(line)))
        offset += len(line)
    return elements


def read_plan(path, offset, length):
    """The plan written by :func:`write_plans` at ``offset`` of ``path``."""
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "rb") as f:
        f.seek(offset)
        item = json.loads(f.read(length))
    return ShardPlan(item["index"], [conversion.Task(kind, paths) for kind, paths in item["tasks"]])


def convert_plan(plan, output_dir, run_id, options):
    """Convert one plan's tasks and write their records into one shard per split; returns
    the plan's summary ``{plan, shards: [manifest entries], tasks: [summarize_task]}``.

    May run any number of times for the same plan, at once or in turn: each attempt writes
    under temporary names of its own and renames complete shards, of the same content,
    over each other. With ``options.strict`` it stops at the first failed task and keeps
    no shard (the driver then publishes nothing).
    """
    attempt = uuid.uuid4().hex[:8]
    open_shards = {}
    tasks, entries = [], []
    try:
        for task in plan.tasks:
            result = conversion.convert_task(task, options)
            tasks.append(conversion.summarize_task(result))
            if options.strict and result["failures"]:
                break
            for record, png in result["records"]:
                if record.split not in open_shards:
                    open_shards[record.split] = OpenShard(output_dir, record.split, plan.index, run_id, attempt)
                open_shards[record.split].write(records.serialize(record, png=png))
        else:
            entries = [open_shards.pop(split).finish() for split in records.SPLITS if split in open_shards]
    finally:
        for shard in open_shards.values():
            shard.discard()
    return {"plan": plan.index, "shards": entries, "tasks": tasks}


def summary_path(scratch, index):
    return join(scratch, f"plan-{index:05d}.json")


def convert_element(element, plans_path, output_dir, run_id, scratch, options):
    """One element of the pipeline: a plan's place in the plans file -> its summary, also
    written to the scratch folder for the driver."""
    index, offset, length = element
    summary = convert_plan(read_plan(plans_path, offset, length), output_dir, run_id, options)
    write_json_atomic(summary_path(scratch, index), summary)
    return summary


def pipeline_options(text=None, workers=1):
    """Beam PipelineOptions from ``key=value`` items separated by commas (as TFDS'
    ``--beam_pipeline_options``; a flag without a value is ``key`` alone, a flag given
    twice is the key twice). Without a ``runner``, Beam's FnApiRunner on this machine,
    which downloads nothing: ``workers`` processes (``direct_running_mode=multi_processing``),
    or in this process for one."""
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

    flags = [f"--{item.strip()}" for item in (text or "").split(",") if item.strip()]
    given = {flag[2:].split("=", 1)[0] for flag in flags}
    options = PipelineOptions(flags)
    if options.view_as(StandardOptions).runner is None:
        options.view_as(StandardOptions).runner = "FnApiRunner"
        direct = options.view_as(DirectOptions)
        if "direct_num_workers" not in given:
            direct.direct_num_workers = workers
        if "direct_running_mode" not in given:
            direct.direct_running_mode = "multi_processing" if direct.direct_num_workers > 1 else "in_memory"
    return options


def run_pipeline(elements, plans_path, output_dir, run_id, scratch, options, beam_options):
    """Convert every plan in a Beam pipeline; returns when the pipeline has finished
    (raises when it failed)."""
    import apache_beam as beam

    try:
        with beam.Pipeline(options=beam_options) as pipeline:
            _ = (
                pipeline
                | "Plans" >> beam.Create(elements)
                | "Convert" >> beam.Map(convert_element, plans_path, output_dir, run_id, scratch, options)
            )
    except Exception as exc:
        raise conversion.ConversionError(f"the Beam pipeline failed: {type(exc).__name__}: {exc}") from exc


def collect(writer, tally, plans, scratch):
    """Read every plan's summary from ``scratch`` in plan order: its tasks into ``tally``,
    its shards into ``writer`` (which checks each one's size in the output folder)."""
    for plan in plans:
        try:
            summary = read_json(summary_path(scratch, plan.index))
        except FileNotFoundError:
            raise conversion.ConversionError(
                f"shard plan {plan.index} (from {plan.tasks[0].label}) has no summary: the pipeline did not convert it"
            ) from None
        for task in summary["tasks"]:
            tally.add(task)
        for entry in summary["shards"]:
            writer.adopt(entry)


def _absolute(path):
    return path if is_url(path) else os.path.abspath(path)


def convert(inputs, output_dir, options, beam_options=None):
    """``conversion.convert`` on Apache Beam: plan here, convert in ``beam_options``'
    runner (a PipelineOptions, or text for :func:`pipeline_options`), publish here.
    Returns the manifest written."""
    from apache_beam.options.pipeline_options import PipelineOptions

    if not isinstance(beam_options, PipelineOptions):
        beam_options = pipeline_options(beam_options, options.workers)
    output_dir = os.fspath(output_dir)
    prepared = conversion.prepare(inputs, output_dir, options)
    plans = plan_shards(prepared.tasks, options.shard_size_mb)
    tally = conversion.Tally(prepared, options.strict)
    with ShardWriter(output_dir, options.shard_size_mb, prepared.manifest_options) as writer:
        if plans:
            # Absolute paths: a worker may run in another folder.
            scratch = _absolute(writer.scratch)
            plans_path = join(scratch, "plans.jsonl")
            elements = write_plans(plans, plans_path)
            log.info("%d task(s) in %d shard plan(s), run %s", len(prepared.tasks), len(plans), writer.run_id)
            run_pipeline(elements, plans_path, _absolute(output_dir), writer.run_id, scratch, options, beam_options)
            collect(writer, tally, plans, scratch)
        tally.finish(writer)
    return writer.manifest
