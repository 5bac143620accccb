"""evaluate.py and sr_tf.evaluation: baselines that match training, metrics in HU, clear errors."""

import csv
import dataclasses
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests import ROOT
from sr_tf import conversion as convert
from sr_tf import evaluation, inference, metrics, records
from sr_tf.training import loop


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, testdata):
    """A briefly trained tiny residual CNN on real CT (train) and MR/CT (val, test)."""
    base = tmp_path_factory.mktemp("eval")
    data = base / "records"
    split_map = {"CQ500-CT-310": "train", "4MR1": "val", "1CT1": "test"}
    convert.convert([testdata(n) for n in ("693_UNCI.dcm", "MR_small.dcm", "CT_small.dcm")], str(data),
                    convert.Options(split_map=split_map), progress=False)
    config = loop.TrainConfig(model="residual_cnn", scale=2, data=str(data), run_dir=str(base / "run"), steps=10,
                              batch_size=4, patch_size=32, perceptual="none", learning_rate=1e-3,
                              strategy="default", eval_every=10, checkpoint_every=10, model_options={"filters": 16},
                              progress=False, grid_images=1, lr_schedule="constant", ema_decay=0.0, augment=False)
    built = loop.train(config)
    return {"data": str(data), "run": str(base / "run"), "built": built, "config": config}


def test_identical_images_give_infinite_psnr_handled_cleanly(ct_pair, tmp_path):
    hr, _ = ct_pair
    assert math.isinf(float(metrics.psnr(hr[None], hr[None])[0]))
    config = evaluation.EvalConfig(data="unused", scale=2)
    row = evaluation.measure(tf.constant(hr), tf.constant(hr), tf.constant(hr[::2, ::2]), config, window=(-1024, 3071))
    assert math.isinf(row["psnr"]) and math.isinf(row["psnr_hu"]) and row["ssim"] == pytest.approx(1.0)
    rows = [dict(image="a", modality="CT", method="model", **row),
            dict(image="b", modality="CT", method="model", **dict(row, psnr=30.0))]
    summary = evaluation.summarize(rows)
    assert summary["CT"]["model"]["psnr"] == 30.0 and summary["CT"]["model"]["psnr_infinite"] == 1
    # A NaN (a broken model) is not an exact reconstruction: it shows in the mean.
    broken = evaluation.summarize(rows + [dict(rows[1], image="c", psnr=float("nan"))])
    assert math.isnan(broken["CT"]["model"]["psnr"]) and broken["CT"]["model"]["psnr_infinite"] == 1
    evaluation.write_csv(rows, tmp_path / "rows.csv")
    assert "inf" in (tmp_path / "rows.csv").read_text()


def test_bicubic_baseline_and_inputs_match_the_training_validation(tiny_run, tmp_path):
    predictor = inference.load_predictor(tiny_run["run"])
    config = evaluation.EvalConfig(data=tiny_run["data"], split="val", scale=2, figures=1)
    rows, summary = evaluation.run(predictor, config, tmp_path / "out", progress=False)
    # The training loop's own validation (same pipeline, same degradation seed per image).
    from sr_tf.data import pipeline

    val = pipeline.make_dataset(tiny_run["data"], "val", 2, None, 1, degradation="bicubic", seed=0)
    trained = loop.evaluate(tiny_run["built"]["generator"], val, 2)
    assert summary["all"]["bicubic"]["psnr"] == pytest.approx(trained["bicubic_psnr"], abs=1e-4)
    assert summary["all"]["model"]["psnr"] == pytest.approx(trained["psnr"], abs=1e-3)
    assert summary["all"]["bicubic"]["ssim"] == pytest.approx(trained["bicubic_ssim"], abs=1e-5)
    methods = {r["method"] for r in rows}
    assert methods == {"model", "nearest", "bilinear", "bicubic", "lanczos"}


def test_ct_metrics_in_hu_recover_the_unit_psnr(tiny_run, tmp_path):
    predictor = inference.load_predictor(tiny_run["run"])
    config = evaluation.EvalConfig(data=tiny_run["data"], split="test", scale=2, figures=0)
    rows, _ = evaluation.run(predictor, config, tmp_path / "out", progress=False)
    ct = [r for r in rows if r["modality"] == "CT"]
    assert ct and all(abs(r["psnr_hu"] - r["psnr"]) < 1e-3 for r in ct)
    assert all(r["rmse_hu"] > 0 and r["mae_hu"] <= r["rmse_hu"] for r in ct)
    # Interpolation is consistent with its own input by construction; close to it at least.
    bicubic = [r for r in ct if r["method"] == "bicubic"]
    assert all(r["consistency_psnr"] > r["psnr"] for r in bicubic)


def test_missing_model_and_empty_data_give_clear_errors(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="nope"):
        inference.load_predictor(str(tmp_path / "nope.keras"))
    predictor = inference.load_predictor(tiny_run["run"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(records.RecordsError, match="no manifest.json"):
        evaluation.run(predictor, evaluation.EvalConfig(data=str(empty), scale=2), tmp_path / "o", progress=False)
    with pytest.raises(records.RecordsError, match="does not exist"):
        evaluation.run(predictor, evaluation.EvalConfig(data=str(tmp_path / "x"), scale=2), tmp_path / "o",
                       progress=False)
    with pytest.raises(evaluation.EvaluationError, match="needs x4"):
        evaluation.run(predictor, evaluation.EvalConfig(data=tiny_run["data"], scale=4), tmp_path / "o",
                       progress=False)


def test_cli_writes_csv_summary_and_figures(tiny_run, tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "evaluate.py", f"--model={tiny_run['run']}", f"--data={tiny_run['data']}",
                           f"--output={out}", "--noprogress", "--figures=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "vs bicubic" in proc.stdout
    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # Projection is on by default: the model is reported without and with it.
    assert len(rows) == 6 and {r["method"] for r in rows} == {"model", "model+projection", "nearest", "bilinear",
                                                              "bicubic", "lanczos"}
    assert rows[0]["modality"] == "CT" and float(rows[0]["rmse_hu"]) > 0
    summary = (out / "summary.md").read_text()
    assert "gain over bicubic" in summary and "| model |" in summary and "| model+projection |" in summary
    assert "data-consistency projection (" in summary and "model+projection" in proc.stdout
    assert (out / "figure_00.png").stat().st_size > 10000
    bad = subprocess.run([sys.executable, "evaluate.py", f"--model={tmp_path / 'missing'}", "--noprogress"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "missing" in bad.stderr


def test_tflite_and_keras_of_the_same_model_give_the_same_metrics(tiny_run, tmp_path):
    """A .tflite and a .keras of the same model give evaluation metrics within 0.05 dB."""
    from sr_tf import export

    export.export(tiny_run["run"], tmp_path / "export", variants=("float32",), consistency="none")
    config = evaluation.EvalConfig(data=tiny_run["data"], split="test", scale=2, figures=0)
    _, keras_summary = evaluation.run(inference.load_predictor(tiny_run["run"]), config, tmp_path / "keras",
                                      progress=False)
    tflite = inference.load_predictor(str(tmp_path / "export" / "model_float32.tflite"))
    assert tflite.kind == "tflite"
    _, tflite_summary = evaluation.run(tflite, config, tmp_path / "tflite", progress=False)
    keras_model, tflite_model = keras_summary["all"]["model"], tflite_summary["all"]["model"]
    for metric in ("psnr", "consistency_psnr", "psnr_hu"):
        assert abs(keras_model[metric] - tflite_model[metric]) < 0.05, metric
    assert abs(keras_model["ssim"] - tflite_model["ssim"]) < 1e-4


def test_a_model_inconsistent_with_its_input_is_flagged():
    from sr_tf import evaluation

    rows = [
        {"image": f"a#{i}", "modality": "MR", "method": method, "psnr": 30.0, "ssim": 0.9, "nrmse": 0.1,
         "consistency_psnr": value}
        for i in range(2) for method, value in (("model", 38.0 + i), ("bicubic", 40.0))
    ]
    summary = evaluation.summarize(rows)
    config = evaluation.EvalConfig(data="d")
    text = evaluation.summary_markdown(summary, "gan", config)
    assert "**Flagged**: data consistency 38.50 dB is 1.50 dB under bicubic's" in text
    assert "FLAGGED" in evaluation.console_summary(summary)
    for row in rows:
        if row["method"] == "model":
            row["consistency_psnr"] = 39.5
    fine = evaluation.summarize(rows)
    assert "Flagged" not in evaluation.summary_markdown(fine, "psnr", config)
    assert evaluation.consistency_warning(fine["MR"]) is None


def test_projection_is_reported_beside_the_model_with_its_time(tiny_run, tmp_path):
    predictor = inference.load_predictor(tiny_run["run"])
    config = evaluation.EvalConfig(data=tiny_run["data"], split="test", scale=2, figures=0, consistency="project",
                                   consistency_iterations=10)
    rows, summary = evaluation.run(predictor, config, tmp_path / "out", progress=False)
    model, projected = summary["all"]["model"], summary["all"][evaluation.PROJECTED]
    assert projected["consistency_psnr"] > 60.0 and projected["consistency_psnr"] > model["consistency_psnr"] + 10
    assert projected["psnr"] > model["psnr"] - 0.05  # a nearly untrained model: no loss either
    timed = [r for r in rows if r["method"] in ("model", evaluation.PROJECTED)]
    assert timed and all(r["seconds"] > 0 for r in timed)
    assert "10 iterations" in (tmp_path / "out" / "summary.md").read_text()
    from sr_tf import consistency

    bad = dataclasses.replace(config, consistency="sometimes")
    with pytest.raises(consistency.ConsistencyError, match="--consistency must be one of none, project"):
        evaluation.run(predictor, bad, tmp_path / "bad", progress=False)
    with pytest.raises(consistency.ConsistencyError, match="--consistency_iterations.*got -2"):
        evaluation.run(predictor, dataclasses.replace(config, consistency_iterations=-2), tmp_path / "bad",
                       progress=False)


def test_ensemble_and_adaptation_are_reported_beside_the_model(tiny_run, tmp_path, testdata, caplog):
    predictor = inference.load_predictor(tiny_run["run"])
    # The 512 x 512 CT: at x2 its 256 px input is large enough to adapt to.
    large = tmp_path / "large"
    convert.convert([testdata("693_UNCI.dcm")], str(large), convert.Options(split_map={"CQ500-CT-310": "test"}),
                    progress=False)
    config = evaluation.EvalConfig(data=str(large), split="test", scale=2, figures=0, ensemble=True,
                                   adapt_steps=3, adapt_seed=1)
    rows, summary = evaluation.run(predictor, config, tmp_path / "out", progress=False)
    methods = summary["all"]
    for method in (evaluation.ENSEMBLED, evaluation.ADAPTED):
        assert math.isfinite(methods[method]["psnr"]) and methods[method]["psnr"] != methods["model"]["psnr"]
        assert all(r["seconds"] > 0 for r in rows if r["method"] == method)
    # the ensemble of a model is not far from it, and never below bicubic by much more than the model is
    assert abs(methods[evaluation.ENSEMBLED]["psnr"] - methods["model"]["psnr"]) < 1.0
    with pytest.raises(ValueError, match="adapt_steps must be a whole number >= 0"):
        evaluation.run(predictor, dataclasses.replace(config, adapt_steps=-1), tmp_path / "bad", progress=False)
    # The 128 x 128 CT's 64 px input is too small to adapt to: no adapted row, the rest measured.
    with caplog.at_level(logging.WARNING, logger="sr_tf.evaluation"):
        small_rows, _ = evaluation.run(predictor, dataclasses.replace(config, data=tiny_run["data"], ensemble=False),
                                       tmp_path / "small", progress=False)
    assert {r["method"] for r in small_rows} == {"model", "nearest", "bilinear", "bicubic", "lanczos"}
    assert any("CT_small.dcm#0: no model+adaptation row: the input (64 x 64) is too small to adapt to at x2"
               in r.getMessage() for r in caplog.records)

    class Nearest(inference.Predictor):  # a runtime without trainable weights (as TFLite)
        kind = "tflite"
        _model_scale = 2

        def predict(self, batch):
            return np.repeat(np.repeat(np.asarray(batch, np.float32), 2, axis=1), 2, axis=2)

    with pytest.raises(evaluation.EvaluationError, match="adaptation needs a Keras model"):
        evaluation.run(Nearest("nearest.tflite", "nearest"), config, tmp_path / "bad", progress=False)
