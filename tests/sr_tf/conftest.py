"""Fixtures of the library's tests."""

import numpy as np
import pydicom
import pytest


@pytest.fixture(scope="session")
def ct_pair(testdata):
    """A real 512x512 head CT in [0, 1] (H, W, 1) and its bicubic x4 reconstruction."""
    import tensorflow as tf

    from sr_tf import metrics

    ds = pydicom.dcmread(testdata("693_UNCI.dcm"))
    hu = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
    hr = np.clip((hu + 1024.0) / 4095.0, 0, 1).astype(np.float32)[..., None]
    lr = tf.image.resize(hr[None], (128, 128), method="bicubic", antialias=True)
    test = metrics.upsample(lr, (512, 512), "bicubic")[0].numpy()
    return hr, test
