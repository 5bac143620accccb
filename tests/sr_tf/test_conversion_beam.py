"""sr_tf.conversion_beam: the conversion as a Beam pipeline gives what the local runner gives.

Runners used, all on this machine and downloading nothing: Beam's FnApiRunner in this
process and with two worker processes (``direct_running_mode=multi_processing``), and the
PortableRunner against a local job service on localhost with ``environment_type=LOOPBACK``.
"""

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import tensorflow as tf

from tests import ROOT
from sr_tf import conversion, conversion_beam, records
from sr_tf.io import files, samples
from sr_tf.io.shards import ShardWriter

SHARD_MB = 2.0  # the sample set in four shard plans


def raw_records(folder, manifest=None):
    """Serialized records of a data_prep output per split, sorted, read from the listed
    shards only, each checked against its size and SHA-256."""
    manifest = manifest or records.read_manifest(folder)
    return {
        split: sorted(r.numpy() for r in tf.data.TFRecordDataset(records.shard_files(folder, split, manifest, True)))
        for split in records.SPLITS
    }


def assert_same_conversion(beam, local, beam_folder, local_folder):
    """The same records, splits, counts, failures and statistics; a manifest of the same form;
    nothing in the Beam output folder but the manifest and the shards it lists."""
    assert set(beam) == set(local)
    assert beam["counts"] == local["counts"]
    assert beam["failed"] == local["failed"]
    assert beam["stats"] == local["stats"]
    assert {**beam["options"], "runner": "local"} == local["options"] and beam["options"]["runner"] == "beam"
    assert all(set(shard) == set(local["shards"][0]) for shard in beam["shards"])
    assert raw_records(beam_folder, beam) == raw_records(local_folder, local)
    assert sorted(os.listdir(beam_folder)) == sorted([records.MANIFEST_NAME] + [s["file"] for s in beam["shards"]])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, testdata):
    """The sample set and bad inputs: two that fail while reading, one while planning, a
    missing path, and a text file that a folder walk skips."""
    src = tmp_path_factory.mktemp("bad")
    data = open(testdata("CT_small.dcm"), "rb").read()
    (src / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    (src / "empty.dcm").write_bytes(b"")
    (src / "notes.txt").write_text("not an image")
    return [os.fspath(src), os.fspath(src / "missing.dcm")] + samples.sample_paths()


@pytest.fixture(scope="module")
def local(inputs, tmp_path_factory):
    """The local runner's output (two processes), the reference."""
    folder = os.fspath(tmp_path_factory.mktemp("local") / "out")
    options = conversion.Options(split_map=dict(samples.SAMPLE_SPLITS), shard_size_mb=SHARD_MB, workers=2)
    return folder, conversion.convert(inputs, folder, options, progress=False)


def test_multi_processing_runner_from_the_command_line_matches_the_local_runner(inputs, local, tmp_path):
    folder = tmp_path / "beam"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, "-m", "data_prep", "--samples", f"--input={inputs[0]},{inputs[1]}", f"--output={folder}",
         f"--shard_size_mb={SHARD_MB}", "--workers=2", "--runner=beam", "--noprogress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote 160 records" in done.stdout and "4 input(s) failed" in done.stdout, done.stdout
    manifest = records.read_manifest(folder)
    assert_same_conversion(manifest, local[1], folder, local[0])
    reasons = {os.path.basename(f["input"]): f["reason"] for f in manifest["failed"]}
    assert set(reasons) == {"missing.dcm", "empty.dcm", "truncated.dcm", "broken.png"}
    assert "not a decodable" in reasons["broken.png"] and reasons["empty.dcm"] == "empty file (0 bytes)"
    assert [s["input"] for s in manifest["stats"]["skipped_files"]] == [inputs[0] + "/notes.txt"]
    # Several plans, so that the two workers share them; one shard per plan and split.
    assert len({s["file"].split("-")[1] for s in manifest["shards"]}) >= 3


def test_portable_runner_on_a_local_job_service_matches_the_local_runner(inputs, local, tmp_path):
    port_file = tmp_path / "job_service.port"
    service = subprocess.Popen(
        [sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main", "--port=0",
         f"--port_file={port_file}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert service.poll() is None and time.monotonic() < deadline, "the job service did not start"
            time.sleep(0.2)
        endpoint = f"localhost:{port_file.read_text().strip()}"
        options = conversion.Options(split_map=dict(samples.SAMPLE_SPLITS), shard_size_mb=SHARD_MB, workers=2,
                                     runner="beam")
        beam_options = f"runner=PortableRunner,job_endpoint={endpoint},environment_type=LOOPBACK"
        manifest = conversion.convert(inputs, tmp_path / "beam", options, beam_options=beam_options)
    finally:
        service.terminate()
        service.wait(timeout=60)
    assert_same_conversion(manifest, local[1], tmp_path / "beam", local[0])


ATTEMPT = textwrap.dedent(
    """
    import json, os, sys
    from sr_tf import conversion, conversion_beam, records

    out, run_id, scratch, plans_path, element, die_at = sys.argv[1:]
    serialize, calls = records.serialize, []

    def dying(*args, **kwargs):  # the worker is killed in the middle of its shard
        calls.append(1)
        if len(calls) == int(die_at):
            os._exit(9)
        return serialize(*args, **kwargs)

    records.serialize = dying
    options = conversion.Options(val_fraction=0.0, test_fraction=0.0)
    summary = conversion_beam.convert_element(tuple(json.loads(element)), plans_path, out, run_id, scratch, options)
    print(json.dumps(summary))
    """
)


def test_a_killed_and_repeated_plan_leaves_one_complete_shard_listed(testdata, tmp_path):
    inputs = [testdata("emri_small.dcm"), testdata("CT_small.dcm")]  # 10 frames and one slice
    options = conversion.Options(val_fraction=0.0, test_fraction=0.0)
    out = os.fspath(tmp_path / "out")
    prepared = conversion.prepare(inputs, out, options)
    plans = conversion_beam.plan_shards(prepared.tasks, 100)
    assert len(plans) == 1
    with ShardWriter(out, 100, prepared.manifest_options) as writer:
        plans_path = files.join(writer.scratch, "plans.jsonl")
        (element,) = conversion_beam.write_plans(plans, plans_path)

        def attempt(die_at):  # one attempt at the plan in a worker process of its own
            return subprocess.run([sys.executable, "-c", ATTEMPT, out, writer.run_id, writer.scratch, plans_path,
                                   json.dumps(element), str(die_at)], cwd=ROOT, capture_output=True, text=True,
                                  timeout=300)

        killed = attempt(die_at=4)
        assert killed.returncode == 9, killed.stderr[-2000:]
        partial = [n for n in os.listdir(out) if n.endswith(".incomplete")]
        assert len(partial) == 1 and partial[0].startswith(f".train-00000-{writer.run_id}.tfrecord.")
        # The runner retries the plan in another process, and a speculative copy runs here.
        retried = attempt(die_at=0)
        assert retried.returncode == 0, retried.stderr[-2000:]
        copy = conversion_beam.convert_element(element, plans_path, out, writer.run_id, writer.scratch, options)
        assert json.loads(retried.stdout.splitlines()[-1]) == copy  # the same shard, byte for byte
        assert len(copy["shards"]) == 1 and copy["shards"][0]["records"] == 11
        tally = conversion.Tally(prepared)
        conversion_beam.collect(writer, tally, plans, writer.scratch)
        tally.finish(writer)
    manifest = writer.manifest
    assert manifest["counts"] == {"train": 11, "val": 0, "test": 0}
    assert sorted(os.listdir(out)) == sorted([records.MANIFEST_NAME, manifest["shards"][0]["file"]])
    reference = conversion.convert(inputs, tmp_path / "local", options, progress=False)
    assert raw_records(out) == raw_records(tmp_path / "local")
    assert manifest["stats"] == reference["stats"]


def test_a_plan_without_summary_fails_and_removes_what_the_run_wrote(testdata, tmp_path):
    out = os.fspath(tmp_path / "out")
    options = conversion.Options(val_fraction=0.0, test_fraction=0.0)
    before = conversion.convert([testdata("MR_small.dcm")], out, options, progress=False)
    prepared = conversion.prepare([testdata("CT_small.dcm"), testdata("emri_small.dcm")], out, options)
    plans = conversion_beam.plan_shards(prepared.tasks, 0.01)  # one plan per file
    assert len(plans) == 2
    with pytest.raises(conversion.ConversionError, match=r"shard plan 1 \(from .*\.dcm\) has no summary: the pipeline did not convert it"):
        with ShardWriter(out, 100, prepared.manifest_options) as writer:
            plans_path = files.join(writer.scratch, "plans.jsonl")
            elements = conversion_beam.write_plans(plans, plans_path)
            conversion_beam.convert_element(elements[0], plans_path, out, writer.run_id, writer.scratch, options)
            conversion_beam.convert_plan(plans[1], out, writer.run_id, options)  # its shards, but no summary
            # The published manifest and shard, the lock, this run's scratch folder and two shards.
            assert len(os.listdir(out)) == 6
            conversion_beam.collect(writer, conversion.Tally(prepared), plans, writer.scratch)
    assert records.read_manifest(out) == before
    assert sorted(os.listdir(out)) == sorted([records.MANIFEST_NAME] + [s["file"] for s in before["shards"]])


def test_strict_and_no_output_fail_as_with_the_local_runner(testdata, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    inputs = [testdata("CT_small.dcm"), os.fspath(broken), testdata("MR_small.dcm")]
    errors = {}
    for runner in ("local", "beam"):
        out = tmp_path / runner
        with pytest.raises(conversion.ConversionError) as strict:
            conversion.convert(inputs, out, conversion.Options(runner=runner, strict=True), progress=False)
        with pytest.raises(conversion.ConversionError) as nothing:
            conversion.convert([os.fspath(broken)], out, conversion.Options(runner=runner), progress=False)
        errors[runner] = (str(strict.value), str(nothing.value).replace(os.fspath(out), "OUT"))
        assert os.listdir(out) == []
    assert errors["beam"] == errors["local"]
    assert "broken.png: not a decodable" in errors["beam"][0] and "no image could be converted" in errors["beam"][1]


def test_an_object_store_output_through_gfile(testdata, tmp_path):
    """A URL output folder (TensorFlow's in-memory file system, reached as gs:// or s3://
    would be): shards, manifest, and a rerun that replaces the previous output."""
    out = f"ram://{uuid.uuid4().hex}/records"
    options = conversion.Options(val_fraction=0.0, test_fraction=0.0, runner="beam")
    conversion.convert([testdata("CT_small.dcm"), testdata("MR_small.dcm")], out, options)
    manifest = conversion.convert([testdata("emri_small.dcm")], out, options)
    assert files.read_json(files.join(out, records.MANIFEST_NAME)) == manifest
    assert sorted(tf.io.gfile.listdir(out)) == sorted([records.MANIFEST_NAME] + [s["file"] for s in manifest["shards"]])
    (shard,) = manifest["shards"]
    path = files.join(out, shard["file"])
    assert files.size(path) == shard["bytes"] and files.file_sha256(path) == shard["sha256"]
    local = conversion.convert([testdata("emri_small.dcm")], tmp_path / "local",
                               conversion.Options(val_fraction=0.0, test_fraction=0.0), progress=False)
    assert sorted(r.numpy() for r in tf.data.TFRecordDataset(path)) == raw_records(tmp_path / "local")["train"]
    assert manifest["counts"] == local["counts"] == {"train": 10, "val": 0, "test": 0}


def test_pipeline_options_from_key_value_items():
    from apache_beam.options.pipeline_options import (DebugOptions, DirectOptions, PortableOptions, SetupOptions,
                                                      StandardOptions)

    def view(options, kind):
        return options.view_as(kind)

    default = conversion_beam.pipeline_options(None, workers=2)
    assert view(default, StandardOptions).runner == "FnApiRunner"
    assert (view(default, DirectOptions).direct_num_workers, view(default, DirectOptions).direct_running_mode) == (
        2, "multi_processing")
    assert view(conversion_beam.pipeline_options("", workers=1), DirectOptions).direct_running_mode == "in_memory"
    three = conversion_beam.pipeline_options("direct_num_workers=3", workers=1)
    assert (view(three, DirectOptions).direct_num_workers, view(three, DirectOptions).direct_running_mode) == (
        3, "multi_processing")
    portable = conversion_beam.pipeline_options(
        "runner=PortableRunner, job_endpoint=localhost:8099,environment_type=LOOPBACK,experiments=a,experiments=b,"
        "save_main_session", workers=2)
    assert view(portable, StandardOptions).runner == "PortableRunner"
    assert view(portable, PortableOptions).job_endpoint == "localhost:8099"
    assert view(portable, PortableOptions).environment_type == "LOOPBACK"
    assert view(portable, DebugOptions).experiments == ["a", "b"]
    assert view(portable, SetupOptions).save_main_session is True
    assert view(portable, DirectOptions).direct_num_workers == 1  # a runner given: nothing of ours added


def test_plans_cut_consecutive_tasks_by_input_size(tmp_path):
    sizes = [300, 300, 500, 2000, 100, 100]
    tasks = []
    for k, n in enumerate(sizes):
        (tmp_path / f"{k}.png").write_bytes(bytes(n))
        tasks.append(conversion.Task("raster", [os.fspath(tmp_path / f"{k}.png")]))
    plans = conversion_beam.plan_shards(tasks, 1000 / 2**20)
    assert [[os.path.basename(t.paths[0]) for t in p.tasks] for p in plans] == [
        ["0.png", "1.png"], ["2.png"], ["3.png"], ["4.png", "5.png"]]
    assert [p.index for p in plans] == [0, 1, 2, 3]
    path = files.join(os.fspath(tmp_path), "plans.jsonl")
    elements = conversion_beam.write_plans(plans, path)
    assert [conversion_beam.read_plan(path, *element[1:]) for element in elements] == plans
