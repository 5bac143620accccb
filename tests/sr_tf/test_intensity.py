"""sr_tf.intensity: the one mapping between physical values, stored levels and [0, 1]."""

import numpy as np
import pydicom
import pytest
import tensorflow as tf
from pydicom.pixels import apply_modality_lut

from sr_tf import intensity


@pytest.fixture
def hu(testdata):
    ds = pydicom.dcmread(testdata("CT_small.dcm"))
    return apply_modality_lut(ds.pixel_array, ds).astype(np.float64)


def test_stored_levels_recover_hu_within_one_step(hu):
    lo, hi = intensity.CT_RANGE
    hu = hu.copy()
    hu[0, :3] = (-3024.0, 3500.0, 9000.0)  # padding and metal, outside the window
    stored, clipped = intensity.to_stored(hu, lo, hi)
    assert stored.dtype == np.uint16 and clipped == int(np.count_nonzero((hu < lo) | (hu > hi)))
    back = intensity.to_physical(stored, lo, hi)
    inside = (hu >= lo) & (hu <= hi)
    assert np.max(np.abs(back - hu)[inside]) <= intensity.quantisation_step(lo, hi) / 2 + 1e-9
    assert back[~inside].min() >= lo and back[~inside].max() <= hi  # clipped, not wrapped


def test_unit_values_are_the_stored_levels_over_65535(hu):
    lo, hi = intensity.CT_RANGE
    unit = intensity.to_unit(hu, lo, hi)
    assert unit.dtype == np.float32 and unit.min() >= 0.0 and unit.max() <= 1.0
    stored, _ = intensity.to_stored(hu, lo, hi)
    from_stored = intensity.stored_to_unit(stored)
    np.testing.assert_allclose(unit, from_stored, atol=0.5 / intensity.STORED_MAX + 1e-7)
    # The same function on a tensor, as the tf.data pipeline and records.parse call it.
    tensor = intensity.stored_to_unit(tf.constant(stored))
    np.testing.assert_array_equal(tensor.numpy(), from_stored)
    # [0, 1] back to physical: the window's ends.
    assert intensity.to_physical(np.float32(0.0), lo, hi) == lo and intensity.to_physical(np.float32(1.0), lo, hi) == hi


def test_per_slice_windows_broadcast(hu):
    stack = np.stack([hu, hu * 2])
    windows = np.array([[-1000.0, 1000.0], [-2000.0, 2000.0]])
    unit = intensity.to_unit(stack, windows[:, :1, None], windows[:, 1:, None])
    np.testing.assert_allclose(unit[0], unit[1], atol=1e-6)  # twice the values through twice the window


def test_levels_of_an_8_bit_output():
    levels = intensity.to_levels(np.array([0.0, 50.0, 100.0]), 0.0, 100.0, peak=255)
    np.testing.assert_allclose(levels, [0.0, 127.5, 255.0])


def test_default_windows(testdata):
    assert intensity.xray_range(12) == (0.0, 4095.0)
    mr = pydicom.dcmread(testdata("MR_small.dcm")).pixel_array
    lo, hi = intensity.percentile_range(mr)
    assert lo == 0.0 and hi == pytest.approx(np.percentile(mr, intensity.MR_PERCENTILE))
    assert intensity.percentile_range(np.array([0.0, 0.0, 0.0, 7.0]), 50) == (0.0, 7.0)  # p50 is 0: the maximum


@pytest.mark.parametrize("call", [
    lambda: intensity.to_stored(np.zeros(3), 5.0, 5.0),
    lambda: intensity.to_unit(np.zeros(3), 1.0, 0.0),
    lambda: intensity.percentile_range(np.array([-1.0, 0.0])),
    lambda: intensity.percentile_range(np.array([np.nan])),
])
def test_bad_windows_are_refused(call):
    with pytest.raises(ValueError):
        call()
