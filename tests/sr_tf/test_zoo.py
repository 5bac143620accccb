"""The model zoo: names resolve everywhere, bad names and files fail clearly, and the
shipped models do what their cards claim on real images."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests import ROOT
from sr_tf import inference, models, zoo
from sr_tf.models import blocks

NAME = "residual_cnn_x2"  # a zoo name, stood in for by a tiny model in a scratch zoo


@pytest.fixture
def scratch_zoo(tmp_path, monkeypatch):
    """A zoo folder holding an untrained tiny ``residual_cnn_x2`` with its card."""
    root = tmp_path / "zoo"
    folder = root / NAME
    folder.mkdir(parents=True)
    models.build("residual_cnn", scale=2, filters=4).save(folder / zoo.KERAS_FILE)
    card = {"name": NAME, "model": "residual_cnn", "model_scale": 2, "scale": 2, "degradation": "bicubic",
            "training": {"model": "residual_cnn", "scale": 2, "degradation": "bicubic"}}
    (folder / zoo.CARD_FILE).write_text(json.dumps(card))
    monkeypatch.setattr(zoo, "ZOO_DIR", str(root))
    return root


def test_a_zoo_name_resolves_in_python(scratch_zoo):
    assert zoo.resolve(NAME) == os.path.join(str(scratch_zoo), NAME)
    model = models.pretrained(NAME)
    assert model.scale == 2 and model.filters == 4
    predictor = inference.load_predictor(NAME)
    assert predictor.name == NAME and predictor.scale == 2 and predictor.config["degradation"] == "bicubic"
    assert predictor.predict(np.zeros((1, 8, 8, 1), np.float32)).shape == (1, 16, 16, 1)


def test_an_existing_path_wins_over_a_name(scratch_zoo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).mkdir()
    assert zoo.resolve(NAME) == NAME  # the local folder, not the zoo's


def test_unknown_missing_and_corrupt_zoo_models_fail_clearly(scratch_zoo):
    with pytest.raises(zoo.ZooError, match="swift_srgan_x4.*residual_cnn_x2|residual_cnn_x2.*swift_srgan_x4"):
        models.pretrained("no_such_model")
    with pytest.raises(ValueError, match="neither a file nor a zoo model"):
        inference.load_predictor("no_such_model")
    with pytest.raises(zoo.ZooError, match=r"swift_srgan_x4.*generator\.keras is missing.*zoo\.py --build"):
        models.pretrained("swift_srgan_x4")
    keras_file = scratch_zoo / NAME / zoo.KERAS_FILE
    keras_file.write_bytes(keras_file.read_bytes()[:300])
    with pytest.raises(zoo.ZooError, match=f"{NAME}.*generator.keras cannot be loaded"):
        models.pretrained(NAME)
    with pytest.raises(ValueError, match=r"generator\.keras: not a valid \.keras archive"):
        inference.load_predictor(NAME)


def _run(script, *args, zoo_dir):
    env = dict(os.environ, SR_TF_ZOO=str(zoo_dir), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_front_ends_take_a_zoo_name(scratch_zoo, tmp_path, testdata):
    out = tmp_path / "up"
    proc = _run("upscale.py", f"--model={NAME}", f"--input={testdata('CT_small.dcm')}", f"--output={out}",
                "--noprogress", zoo_dir=scratch_zoo)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.isfile(out / "CT_small_x2.dcm")
    proc = _run("export.py", f"--model={NAME}", f"--output={tmp_path / 'export'}", "--variants=float32",
                zoo_dir=scratch_zoo)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.isfile(tmp_path / "export" / "model_float32.tflite")
    bad = _run("export.py", "--model=no_such_model", zoo_dir=scratch_zoo)
    assert bad.returncode == 1 and "zoo models: residual_cnn_x2" in bad.stderr


# ----------------------------------------------------------------------------- shipped models

SHIPPED = [name for name in zoo.RECIPES if os.path.isfile(os.path.join(zoo.ZOO_DIR, name, zoo.KERAS_FILE))]
SHIPPED_PSNR = [name for name in SHIPPED if zoo.RECIPES[name].kind == "psnr"]


def test_every_recipe_is_shipped():
    assert SHIPPED == list(zoo.RECIPES)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_card_is_complete(name):
    card = zoo.card(name)
    for key in ("command", "reproduce", "seed", "trained", "evaluation", "form", "kind", "files"):
        assert card.get(key) is not None, key
    assert card["command"].startswith("python train.py") and "--data=tfrecords/samples" in card["command"]
    assert card["trained"]["steps"] > 0 and card["trained"]["machine"]["cores"] >= 1
    for entry in card["files"]:
        assert os.path.getsize(os.path.join(zoo.folder(name), entry["path"])) == entry["bytes"]
    tflite = inference.load_predictor(os.path.join(zoo.folder(name), zoo.TFLITE_FILE))
    keras_model = inference.load_predictor(name)
    lr = np.random.default_rng(0).random((1, 20, 24, 1), dtype=np.float32)
    np.testing.assert_allclose(tflite.predict(lr), keras_model.predict(lr), atol=2e-3)


@pytest.mark.parametrize("name", SHIPPED_PSNR)
def test_shipped_model_returns_a_constant_image_unchanged(name):
    predictor = inference.load_predictor(name)
    for level in (0.0, 0.02, 0.37, 0.8, 1.0):
        out = predictor.predict(np.full((1, 24, 24, 1), level, np.float32))
        np.testing.assert_allclose(out, level, atol=1e-3)


@pytest.fixture(scope="module")
def development_crop(testdata):
    """A 192x192 crop of the development MR, in [0, 1] over its stored range."""
    import pydicom

    ds = pydicom.dcmread(testdata("MR-SIEMENS-DICOM-WithOverlays.dcm"))
    image = ds.pixel_array.astype(np.float32)
    image = np.clip(image / np.percentile(image, 99.9), 0, 1)
    return image[150:342, 150:342, None]


@pytest.mark.parametrize("name", [n for n in SHIPPED_PSNR if zoo.RECIPES[n].degradation == "bicubic"])
def test_shipped_model_beats_bicubic_on_a_development_image(name, development_crop):
    from sr_tf import metrics
    from sr_tf.data import degrade

    scale = zoo.RECIPES[name].scale
    hr = tf.constant(development_crop[None])
    lr = degrade.downsample(hr, scale)
    out = inference.load_predictor(name).predict(lr.numpy())
    bicubic = np.clip(blocks.bicubic_upsample(lr, scale).numpy(), 0, 1)
    model_psnr = float(metrics.psnr(hr, out, border=scale)[0])
    bicubic_psnr = float(metrics.psnr(hr, bicubic, border=scale)[0])
    assert model_psnr > bicubic_psnr + 0.1, (model_psnr, bicubic_psnr)
