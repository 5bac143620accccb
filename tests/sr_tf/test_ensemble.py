"""The self-ensemble over the eight symmetries of the square and the uncertainty map."""

import numpy as np
import pydicom
import pytest

from sr_tf import ensemble, inference
from sr_tf.data import degrade
from tests.sr_tf.predictors import Nearest


class Leaning(Nearest):
    """Nearest-neighbour plus a left-to-right ramp: not equivariant."""

    def predict(self, batch):
        out = super().predict(batch)
        return out + np.linspace(0.0, 0.1, out.shape[2], dtype=np.float32)[None, None, :, None]


@pytest.fixture(scope="module")
def mr(testdata):
    """pydicom's MR_small.dcm (64 x 64) scaled to [0, 1]."""
    pixels = pydicom.dcmread(testdata("MR_small.dcm")).pixel_array.astype(np.float32)
    return (pixels - pixels.min()) / (pixels.max() - pixels.min())


def test_symmetries_invert_and_are_eight_different_images(mr):
    batch = mr[None, :40, :, None]  # not square: the turns swap height and width
    seen = set()
    for k in range(ensemble.TRANSFORMS):
        turned = ensemble.transform(batch, k)
        np.testing.assert_array_equal(ensemble.inverse(turned, k), batch)
        seen.add(turned.tobytes() + bytes(turned.shape))
    assert len(seen) == ensemble.TRANSFORMS


def test_ensemble_of_an_equivariant_function_is_the_function_with_zero_spread(mr):
    model = Nearest()
    lr = mr[None, :50, :, None]
    mean, spread = ensemble.predict(model, lr)
    np.testing.assert_allclose(mean, model.predict(lr), atol=1e-6)
    np.testing.assert_allclose(spread, 0.0, atol=1e-6)


def test_spread_shows_where_the_eight_outputs_disagree(mr):
    lr = mr[None, :, :, None]
    mean, spread = ensemble.predict(Leaning(), lr)
    assert spread.min() >= 0 and spread.max() > 0.02
    # the mean is equivariant though the model is not: turning the input turns the output
    for k in (1, 6):
        turned, _ = ensemble.predict(Leaning(), ensemble.transform(lr, k))
        np.testing.assert_allclose(turned, ensemble.transform(mean, k), atol=1e-6)


def test_tiled_ensemble_with_spread_equals_the_whole_image_one(mr):
    predictor = ensemble.EnsemblePredictor(Leaning(), spread=True)
    assert predictor.scale == 2
    whole = inference.tiled_predict(predictor, mr, tile=64, overlap=0)
    assert whole.shape == (128, 128, 2)
    mean, spread = ensemble.predict(Leaning(), mr[None, :, :, None])
    np.testing.assert_allclose(whole[..., :1], mean[0], atol=1e-6)
    np.testing.assert_allclose(whole[..., 1:], spread[0], atol=1e-6)
    # Nearest is local: tiles give the whole image's result exactly
    tiled = inference.tiled_predict(ensemble.EnsemblePredictor(Nearest(), spread=True), mr, tile=24, overlap=4)
    np.testing.assert_allclose(tiled, inference.tiled_predict(ensemble.EnsemblePredictor(Nearest(), spread=True), mr,
                                                               tile=64, overlap=0), atol=1e-6)


def test_uncertainty_is_zero_for_a_consistent_output_and_grows_with_its_residual(mr):
    hr = mr[:64, :64]
    lr = degrade.downsample(hr[..., None], 2).numpy()[..., 0]
    zero = np.zeros_like(hr)
    np.testing.assert_allclose(ensemble.uncertainty(lr, hr, zero, 2), 0.0, atol=1e-6)
    wrong = hr.copy()
    wrong[10:20, 10:20] += 0.3  # a structure the input does not show
    u = ensemble.uncertainty(lr, wrong, zero, 2)
    assert u[12:18, 12:18].mean() > 0.1 and np.median(u) < 1e-3
    assert 0 < ensemble.fraction_above(u) < 0.1
    # the spread adds in quadrature
    spread = np.full_like(hr, 0.03)
    np.testing.assert_allclose(ensemble.uncertainty(lr, hr, spread, 2), 0.03, atol=1e-6)
