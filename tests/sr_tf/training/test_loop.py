"""The one training loop: every family learns, strategies agree, runs resume and stop cleanly."""

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import math
import time

import numpy as np
import pytest
import tensorflow as tf

from tests import ROOT
from sr_tf import conversion as convert
from sr_tf import records
from sr_tf.training import loop


TINY = {
    "srgan": {"filters": 8, "num_blocks": 2},
    "swift_srgan": {"filters": 8, "num_blocks": 2},
    "vq_autoencoder": {"filters": 16, "num_res_blocks": 1, "codebook_size": 32, "embedding_dim": 8},
    "residual_cnn": {"filters": 16},
}
TINY_D = {"filters": 8, "dense_units": 16}


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    """Real CT and MR slices: two CTs train, the 64x64 MR validates."""
    from pydicom.data import get_testdata_file

    out = tmp_path_factory.mktemp("records")
    names = ["CT_small.dcm", "693_UNCI.dcm", "MR_small.dcm"]
    split_map = {"1CT1": "train", "CQ500-CT-310": "train", "4MR1": "val"}
    convert.convert([str(get_testdata_file(n)) for n in names], str(out),
                    convert.Options(split_map=split_map), progress=False)
    assert records.read_manifest(out)["counts"] == {"train": 2, "val": 1, "test": 0}
    return str(out)


def tiny_config(data, run_dir, model="residual_cnn", **overrides):
    settings = dict(
        model=model, scale=2, data=data, run_dir=str(run_dir), steps=12, batch_size=4, patch_size=32,
        perceptual="none", learning_rate=1e-3, d_learning_rate=1e-3, strategy="default",
        checkpoint_every=4, eval_every=6, log_every=1, model_options=TINY[model],
        discriminator_options=TINY_D, progress=False, grid_images=1, pretrain_steps=0,
        lr_schedule="constant", ema_decay=0.0, augment=False,  # the bare loop; a test that needs one says so
    )
    settings.update(overrides)
    return loop.TrainConfig(**settings)


def read_metric(run_dir, phase, name):
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        return [float(r["value"]) for r in csv.DictReader(f) if r["phase"] == phase and r["metric"] == name]


@pytest.mark.parametrize("model", ["residual_cnn", "vq_autoencoder", "swift_srgan", "srgan"])
def test_each_family_learns_on_real_slices(tiny_records, tmp_path, model):
    gan = model in ("srgan", "swift_srgan")
    config = tiny_config(tiny_records, tmp_path / "run", model, steps=24 if gan else 16,
                         pretrain_steps=8 if gan else 0)
    result = loop.train(config)
    assert result["finished"] and result["step"] == config.steps
    phase = "adversarial" if gan else "train"
    pixel = read_metric(config.run_dir, phase, "pixel")
    if gan:
        pixel = read_metric(config.run_dir, "pretrain", "pixel") + pixel
        assert read_metric(config.run_dir, "adversarial", "d_real") and read_metric(config.run_dir, "adversarial", "d_fake")
    assert np.mean(pixel[-4:]) < np.mean(pixel[:4]), pixel
    if model == "vq_autoencoder":
        assert all(v > 0 for v in read_metric(config.run_dir, phase, "vq"))
    val = result["val"]
    assert np.isfinite(val["psnr"]) and 0 < val["ssim"] <= 1 and np.isfinite(val["bicubic_psnr"])
    for name in ("generator.keras", "config.json", "metrics.csv"):
        assert os.path.exists(os.path.join(config.run_dir, name))
    assert os.listdir(os.path.join(config.run_dir, "tensorboard"))
    assert os.listdir(os.path.join(config.run_dir, "best"))


def test_existing_run_needs_resume(tiny_records, tmp_path):
    config = tiny_config(tiny_records, tmp_path / "run", steps=4)
    loop.train(config)
    with pytest.raises(loop.TrainingError, match="--resume"):
        loop.train(tiny_config(tiny_records, tmp_path / "run", steps=8))
    resumed = loop.train(tiny_config(tiny_records, tmp_path / "run", steps=8, resume=True))
    assert resumed["step"] == 8


def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(tiny_records, tmp_path, monkeypatch):
    import tensorflow as tf

    from sr_tf.training import trainers

    original = trainers.SupervisedTrainer._content_losses

    def poisoned(self, hr, sr):
        losses = original(self, hr, sr)
        bad = tf.where(self.g_optimizer.iterations >= 6, np.float32(np.nan), np.float32(1.0))
        losses["pixel"] = losses["pixel"] * bad
        return losses

    monkeypatch.setattr(trainers.SupervisedTrainer, "_content_losses", poisoned)
    config = tiny_config(tiny_records, tmp_path / "run", steps=12, checkpoint_every=4)
    with pytest.raises(loop.TrainingError, match="non-finite loss at step 7.*ckpt-4"):
        loop.train(config)
    import tensorflow as tf  # noqa: F811

    assert tf.train.latest_checkpoint(os.path.join(config.run_dir, "checkpoints")).endswith("ckpt-4")
    assert not os.path.exists(os.path.join(config.run_dir, "generator.keras"))


def _train_cli(tiny_records, run_dir, *extra):
    args = [sys.executable, "train.py", "--model=residual_cnn", "--scale=2", f"--data={tiny_records}",
            f"--run_dir={run_dir}", "--batch_size=4", "--patch_size=32", "--checkpoint_every=5",
            "--eval_every=1000", "--log_every=1", "--noprogress", "--strategy=default",
            '--model_options={"filters": 16}', *extra]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return args, env


def _wait_for(predicate, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _latest_step(run_dir):
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    return int(latest.rsplit("-", 1)[1]) if latest else 0


def test_sigkill_after_checkpoint_resumes_from_that_step_and_sigterm_saves(tiny_records, tmp_path):
    run_dir = tmp_path / "run"
    args, env = _train_cli(tiny_records, run_dir, "--steps=100000")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert _wait_for(lambda: _latest_step(run_dir) >= 5, 240), "no checkpoint was written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = _latest_step(run_dir)
    assert killed_at >= 5 and killed_at % 5 == 0
    # Resume: starts from the checkpoint's step; SIGTERM then checkpoints and exits 0.
    args, env = _train_cli(tiny_records, run_dir, "--steps=100000", "--resume")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = proc.stdout.readline()
    while first and "resumed from step" not in first:
        first = proc.stdout.readline()
    assert f"resumed from step {killed_at}" in first
    assert _wait_for(lambda: _latest_step(run_dir) > killed_at, 240)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM: checkpoint saved at step" in out
    stopped = int(out.split("checkpoint saved at step ")[1].split()[0])
    assert _latest_step(run_dir) == stopped > killed_at


def test_a_run_resumes_from_its_flags_file(tiny_records, tmp_path):
    """flags.txt holds every flag defined when the run was written (TensorFlow's too), and
    each must be known when it is read back."""
    run_dir = tmp_path / "run"
    args, env = _train_cli(tiny_records, run_dir, "--steps=2")
    first = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    resumed = subprocess.run([sys.executable, "train.py", f"--flagfile={run_dir / 'flags.txt'}", "--resume",
                              "--steps=3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from step 2" in resumed.stdout
    assert _latest_step(run_dir) == 3


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from sr_tf.training import loop
    config = loop.TrainConfig(**json.loads(sys.argv[1]))
    rng = np.random.default_rng(0)
    hr = rng.random((4, 32, 32, 1), dtype=np.float32)
    lr = tf.image.resize(hr, (16, 16), antialias=True).numpy()
    weights = None
    results = {}
    for name in ("default", "mirrored"):
        strategy = loop.make_strategy(name)
        built = loop.build(config, strategy)
        if weights is None:
            weights = built["generator"].get_weights()
        else:
            built["generator"].set_weights(weights)
        trainer = built["supervised"]
        data = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices((lr, hr)).batch(4))
        batch = next(iter(data))
        loss = float(loop.distributed_step(strategy, trainer)(batch)["loss"])
        results[name] = ([w.copy() for w in built["generator"].get_weights()], loss, strategy.num_replicas_in_sync)
    (wd, ld, nd), (wm, lm, nm) = results["default"], results["mirrored"]
    assert nd == 1 and nm == 2, (nd, nm)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(wd, wm))
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(wd, weights))
    print(json.dumps({"diff": diff, "moved": moved, "loss_default": ld, "loss_mirrored": lm}))
    """
)


def test_mirrored_on_two_cpus_matches_the_default_strategy(tiny_records, tmp_path):
    config = tiny_config(tiny_records, tmp_path / "run", learning_rate=1e-2)
    payload = json.dumps({k: v for k, v in config.__dict__.items()})
    out = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, payload], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["moved"] > 1e-4  # the step changed the weights
    assert result["diff"] < 1e-5, result
    assert abs(result["loss_default"] - result["loss_mirrored"]) < 1e-5


WORKER_SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    from sr_tf.training import loop
    config = loop.TrainConfig(**json.loads(sys.argv[1]))
    built = loop.train(config)
    np.savez(sys.argv[2], *built["generator"].get_weights())
    print("replicas", built["strategy"].num_replicas_in_sync, "step", built["step"])
    """
)


def _free_ports(count):
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_two_processes_end_with_identical_weights(tiny_records, tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    config = tiny_config(tiny_records, tmp_path / "run", strategy="multi_worker", steps=6, eval_every=6,
                         checkpoint_every=3)
    payload = json.dumps(config.__dict__)
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
                   TF_CPP_MIN_LOG_LEVEL="3")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, payload, str(tmp_path / f"w{index}.npz")],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=400))
        finally:
            proc.kill()
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
        assert "replicas 2 step 6" in out
    a, b = np.load(tmp_path / "w0.npz"), np.load(tmp_path / "w1.npz")
    assert len(a.files) == len(b.files) > 0
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])
    # Only the chief writes the run's checkpoints and generator; workers clean up scratch.
    assert os.path.exists(tmp_path / "run" / "generator.keras")
    assert not [n for n in os.listdir(tmp_path / "run") if n.startswith(".worker")]


def test_time_budget_stops_early_evaluated_and_saved(tiny_records, tmp_path):
    # A budget of 0.6 ms: the first step (which traces the step function) exceeds it.
    config = tiny_config(tiny_records, tmp_path / "run", steps=50, max_minutes=1e-5)
    result = loop.train(config)
    assert result["timed_out"] and result["finished"] and result["step"] < config.steps
    assert result["val"] is not None and math.isfinite(result["val"]["bicubic_psnr"])
    assert (tmp_path / "run" / "generator.keras").exists()
    assert tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints")).endswith(f"ckpt-{result['step']}")
    with pytest.raises(ValueError, match="max_minutes"):
        tiny_config(tiny_records, tmp_path / "other", max_minutes=-1).check()


def test_weight_average_is_evaluated_and_the_better_weights_saved(tiny_records, tmp_path):
    import keras

    config = tiny_config(tiny_records, tmp_path / "run", steps=8, ema_decay=0.9, eval_every=4, augment=True)
    result = loop.train(config)
    with open(os.path.join(config.run_dir, "result.json")) as f:
        saved = json.load(f)
    assert saved["weights"] in ("average", "trained") and saved["step"] == 8
    better = max(saved["val_average"]["psnr"], saved["val_trained"]["psnr"])
    assert saved["val"]["psnr"] == better
    assert read_metric(config.run_dir, "val_average", "psnr")
    model = keras.saving.load_model(os.path.join(config.run_dir, "generator.keras"))
    source = result["average"].averages if saved["weights"] == "average" else result["generator"].trainable_variables
    for mine, theirs in zip(model.trainable_variables, source):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), atol=1e-6)


def test_bfloat16_run_learns_and_saves_a_float32_generator(tiny_records, tmp_path):
    import keras

    config = tiny_config(tiny_records, tmp_path / "run", "srgan", steps=16, pretrain_steps=16,
                         precision="mixed_bfloat16", ema_decay=0.9, eval_every=8)
    result = loop.train(config)
    assert keras.mixed_precision.global_policy().name == "float32"  # the run's policy is put back
    trained = result["generator"]
    assert trained.compute_dtype == "bfloat16" and trained.variable_dtype == "float32"
    assert not isinstance(result["supervised"].g_optimizer, keras.optimizers.LossScaleOptimizer)
    pixel = read_metric(config.run_dir, "pretrain", "pixel")
    assert np.mean(pixel[-4:]) < np.mean(pixel[:4]), pixel
    saved = keras.saving.load_model(os.path.join(config.run_dir, "generator.keras"))
    assert saved.compute_dtype == "float32"
    # The weights saved are the better of the trained and the averaged ones, as in float32.
    source = result["average"].averages if result["weights"] == "average" else trained.trainable_variables
    assert len(saved.trainable_variables) == len(source) and len(saved.weights) == len(trained.weights)
    for mine, theirs in zip(saved.trainable_variables, source):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    for mine, theirs in zip(saved.non_trainable_variables, trained.non_trainable_variables):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    x = np.random.default_rng(0).random((1, 16, 16, 1), dtype=np.float32)
    averaged = result["weights"] == "average"
    with result["average"].applied(trained.trainable_variables) if averaged else contextlib.nullcontext():
        rounded = np.asarray(trained(x))
    exact = np.asarray(saved(x))
    assert exact.dtype == rounded.dtype == np.float32
    np.testing.assert_allclose(exact, rounded, atol=0.02)  # bfloat16 keeps 8 bits of mantissa


@pytest.mark.parametrize("precision, scaled", [("float32", False), ("mixed_float16", True), ("mixed_bfloat16", False)])
def test_only_float16_scales_the_loss(precision, scaled):
    import keras

    optimizer = loop._optimizer(loop.TrainConfig(precision=precision), 1e-4)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer) == scaled
    assert loop.TrainConfig(mixed_precision=True).policy() == "mixed_float16"


def test_precision_settings_are_checked(tiny_records, tmp_path):
    with pytest.raises(ValueError, match="--precision must be one of float32, mixed_float16, mixed_bfloat16"):
        tiny_config(tiny_records, tmp_path / "run", precision="float64").check()
    with pytest.raises(ValueError, match="--mixed_precision means --precision=mixed_float16"):
        tiny_config(tiny_records, tmp_path / "run", precision="mixed_bfloat16", mixed_precision=True).check()


def test_weight_average_update_and_swap():
    from sr_tf.training.trainers import WeightAverage

    weight = tf.Variable([1.0, 2.0])
    average = WeightAverage([weight], decay=0.5)
    weight.assign([3.0, 4.0])
    average.update([weight])  # warm-up decay min(0.5, 2/11)
    decay = 2 / 11
    expected = decay * np.array([1.0, 2.0]) + (1 - decay) * np.array([3.0, 4.0])
    np.testing.assert_allclose(average.averages[0].numpy(), expected, rtol=1e-6)
    with average.applied([weight]):
        np.testing.assert_allclose(weight.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(weight.numpy(), [3.0, 4.0])


def test_init_from_copies_a_trained_generator_and_refuses_another(tiny_records, tmp_path):
    first = tiny_config(tiny_records, tmp_path / "first", steps=3)
    trained = loop.train(first)["generator"]
    built = loop.build(tiny_config(tiny_records, tmp_path / "second", init_from=first.run_dir),
                       tf.distribute.get_strategy())
    for mine, theirs in zip(built["generator"].weights, trained.weights):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    other = tiny_config(tiny_records, tmp_path / "third", model_options={"filters": 8}, init_from=first.run_dir)
    with pytest.raises(loop.TrainingError, match="does not match"):
        loop.build(other, tf.distribute.get_strategy())


def test_adversarial_phase_needs_a_pixel_trained_generator(tiny_records, tmp_path):
    config = tiny_config(tiny_records, tmp_path / "gan", "swift_srgan", pretrain_steps=0)
    with pytest.raises(ValueError, match="PSNR-trained generator"):
        config.check()


def test_resume_refuses_other_settings(tiny_records, tmp_path):
    loop.train(tiny_config(tiny_records, tmp_path / "run", steps=2))
    other = tiny_config(tiny_records, tmp_path / "run", steps=4, resume=True, ema_decay=0.9)
    with pytest.raises(loop.TrainingError, match=r"--ema_decay: the run has 0.0, this command 0.9.*--flagfile="):
        loop.train(other)
    scaled = tiny_config(tiny_records, tmp_path / "run", steps=4, resume=True, mixed_precision=True)
    with pytest.raises(loop.TrainingError, match="the run trained in float32, this command mixed_float16"):
        loop.train(scaled)
    # float32 and mixed_bfloat16 checkpoint the same state: a run continues in the other.
    resumed = loop.train(tiny_config(tiny_records, tmp_path / "run", steps=4, resume=True, precision="mixed_bfloat16"))
    assert resumed["step"] == 4 and resumed["generator"].compute_dtype == "bfloat16"


def test_validation_images_of_different_sizes(tmp_path, testdata):
    """Real data mixes sizes: a 128x128 and a 64x64 validation image, and their image
    summaries, must not stop the run at its first validation."""
    data = tmp_path / "mixed"
    split_map = {"1CT1": "val", "CQ500-CT-310": "train", "4MR1": "val"}
    convert.convert([testdata(n) for n in ("CT_small.dcm", "693_UNCI.dcm", "MR_small.dcm")], str(data),
                    convert.Options(split_map=split_map), progress=False)
    config = tiny_config(str(data), tmp_path / "run", steps=2, eval_every=1, grid_images=2)
    result = loop.train(config)
    assert result["finished"] and os.path.isfile(os.path.join(config.run_dir, "generator.keras"))
    assert len(read_metric(config.run_dir, "val", "psnr")) == 2
