"""sr_tf.data.degrade: shapes, ranges, physics and seeding of every op and preset."""

import numpy as np
import pytest
import tensorflow as tf

from sr_tf.data import degrade


@pytest.fixture(scope="module")
def ct_image(testdata):
    """The 512x512 head CT of pydicom-data, windowed as a record stores it, float32 (H, W, 1)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    from sr_tf import intensity

    ds = pydicom.dcmread(testdata("693_UNCI.dcm"))
    stored, _ = intensity.to_stored(apply_modality_lut(ds.pixel_array, ds), *intensity.CT_RANGE)
    return (stored.astype(np.float32) / intensity.STORED_MAX)[..., np.newaxis]


@pytest.fixture(scope="module")
def hr_batch(ct_image):
    """Four 128x128 tissue crops of the CT (128 divides by 8*8 for self_supervised x8)."""
    corners = [(128, 128), (128, 256), (256, 128), (256, 256)]
    return np.stack([ct_image[y : y + 128, x : x + 128] for y, x in corners])


def laplacian_energy(images):
    kernel = tf.constant([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])[:, :, tf.newaxis, tf.newaxis]
    return float(tf.reduce_mean(tf.square(tf.nn.conv2d(images, kernel, 1, "VALID"))))


@pytest.mark.parametrize("scale", degrade.SCALES)
@pytest.mark.parametrize("preset", degrade.PRESETS)
def test_presets_shapes_dtypes_ranges(preset, scale, hr_batch):
    inputs, targets = degrade.apply(preset, hr_batch, scale, seed=[1, 2])
    target_size = 128 // scale if preset == "self_supervised" else 128
    input_size = target_size // degrade.model_scale(preset, scale)
    assert targets.shape == (4, target_size, target_size, 1)
    assert inputs.shape == (4, input_size, input_size, 1)
    for tensor in (inputs, targets):
        assert tensor.dtype == tf.float32
        assert 0.0 <= float(tf.reduce_min(tensor)) and float(tf.reduce_max(tensor)) <= 1.0
    # One image gives the same shapes without the batch axis.
    single_inputs, single_targets = degrade.apply(preset, hr_batch[0], scale, seed=[1, 2])
    assert single_inputs.shape == inputs.shape[1:] and single_targets.shape == targets.shape[1:]


def test_model_scale_and_target_divisor():
    assert [degrade.model_scale(p, 4) for p in degrade.PRESETS] == [4, 4, 4, 1, 4]
    assert [degrade.target_divisor(p, 4) for p in degrade.PRESETS] == [4, 4, 4, 4, 16]
    assert degrade.blur_sigma_range(2) == (0.5, 1.5) and degrade.blur_sigma_range(8) == (2.0, 6.0)


@pytest.mark.parametrize("kernel", degrade.KERNELS)
def test_downsample_matches_tf_image_resize_antialias(kernel, ct_image):
    image = ct_image[100:228, 60:252]  # 128x192: not square, borders included
    for scale in degrade.SCALES:
        ours = degrade.downsample(image, scale, kernel)
        size = (128 // scale, 192 // scale)
        reference = tf.clip_by_value(tf.image.resize(image, size, method=kernel, antialias=True), 0.0, 1.0)
        np.testing.assert_allclose(ours.numpy(), reference.numpy(), atol=1e-5)


@pytest.mark.parametrize("kernel", degrade.KERNELS)
def test_downsampling_a_constant_gives_the_constant(kernel):
    image = np.full((2, 64, 48, 1), 0.3125, np.float32)
    for scale in degrade.SCALES:
        np.testing.assert_allclose(degrade.downsample(image, scale, kernel).numpy(), 0.3125, atol=1e-6)


def test_sizes_that_do_not_divide_raise():
    with pytest.raises(ValueError, match="height 30 is not a positive multiple of 4"):
        degrade.downsample(np.zeros((30, 32, 1), np.float32), 4)
    with pytest.raises(ValueError, match="multiple of 64"):
        degrade.apply("self_supervised", np.zeros((96, 96, 1), np.float32), 8, seed=0)
    with pytest.raises(ValueError, match="scale must be one of"):
        degrade.downsample(np.zeros((30, 30, 1), np.float32), 3)


def test_bad_preset_kernel_and_ranges_raise():
    image = np.zeros((32, 32, 1), np.float32)
    with pytest.raises(ValueError, match="unknown degradation preset 'jpeg'"):
        degrade.apply("jpeg", image, 2, seed=0)
    with pytest.raises(ValueError, match="unknown degradation preset"):
        degrade.model_scale("jpeg", 2)
    with pytest.raises(ValueError, match="kernel must be one of"):
        degrade.downsample(image, 2, "lanczos3")
    with pytest.raises(ValueError, match="sigma_range"):
        degrade.gaussian_blur(image, (2.0, 1.0), seed=0)
    with pytest.raises(ValueError, match="photons_range"):
        degrade.poisson_noise(image, (0.0, 10.0), seed=0)


def test_blur_lowers_high_frequency_energy_and_keeps_a_constant(hr_batch):
    blurred = degrade.gaussian_blur(hr_batch, (1.0, 2.0), seed=3)
    assert blurred.shape == hr_batch.shape
    assert laplacian_energy(blurred) < 0.2 * laplacian_energy(hr_batch)
    constant = np.full((2, 40, 40, 1), 0.7, np.float32)
    np.testing.assert_allclose(degrade.gaussian_blur(constant, (0.5, 6.0), seed=3).numpy(), 0.7, atol=1e-6)


def test_blur_draws_sigma_per_image(hr_batch):
    same = np.repeat(hr_batch[:1], 4, axis=0)
    blurred = degrade.gaussian_blur(same, (0.5, 3.0), seed=5).numpy()
    energies = [laplacian_energy(blurred[i : i + 1]) for i in range(4)]
    assert len(set(np.round(energies, 8))) == 4


def test_gaussian_noise_has_the_requested_sigma():
    grey = np.full((2, 128, 128, 1), 0.5, np.float32)
    noisy = degrade.gaussian_noise(grey, (0.02, 0.02), seed=7).numpy()
    assert abs(float(np.std(noisy - grey)) - 0.02) < 0.001
    assert abs(float(np.mean(noisy - grey))) < 0.001


def test_poisson_noise_follows_photon_statistics():
    grey = np.full((2, 128, 128, 1), 0.4, np.float32)
    photons = 2000.0
    noisy = degrade.poisson_noise(grey, (photons, photons), seed=7).numpy()
    expected = np.sqrt(0.4 / photons)  # Poisson: variance = counts
    assert abs(float(np.std(noisy)) - expected) < 0.05 * expected
    assert abs(float(np.mean(noisy)) - 0.4) < 0.001
    black = np.zeros((16, 16, 1), np.float32)
    assert float(tf.reduce_max(degrade.poisson_noise(black, (photons, photons), seed=1))) == 0.0


def test_noise_levels_of_the_noisy_preset_are_in_range(hr_batch):
    inputs, _ = degrade.apply("noisy", hr_batch, 2, seed=11)
    clean = degrade.downsample(hr_batch, 2)
    residual = float(np.std(inputs.numpy() - clean.numpy()))
    assert degrade.NOISE_SIGMA_RANGE[0] < residual < 0.05


def test_bilinear_artifacts_are_same_size_and_smoother(hr_batch):
    inputs, targets = degrade.apply("bilinear_artifacts", hr_batch, 4, seed=0)
    assert inputs.shape == targets.shape == hr_batch.shape
    assert laplacian_energy(inputs) < 0.5 * laplacian_energy(targets)


def test_self_supervised_is_a_double_downsampling(hr_batch):
    inputs, targets = degrade.apply("self_supervised", hr_batch, 2, seed=0)
    np.testing.assert_allclose(targets.numpy(), degrade.downsample(hr_batch, 2).numpy())
    np.testing.assert_allclose(inputs.numpy(), degrade.downsample(targets, 2).numpy())


@pytest.mark.parametrize("preset", ["blur_downsample", "noisy"])
def test_same_seed_same_output_different_seed_different(preset, hr_batch):
    first, _ = degrade.apply(preset, hr_batch, 2, seed=[4, 2])
    again, _ = degrade.apply(preset, hr_batch, 2, seed=tf.constant([4, 2], tf.int32))
    other, _ = degrade.apply(preset, hr_batch, 2, seed=[4, 3])
    np.testing.assert_array_equal(first.numpy(), again.numpy())
    assert not np.array_equal(first.numpy(), other.numpy())


def test_runs_in_tf_function_and_tf_data_with_unknown_sizes(hr_batch):
    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 1]), tf.TensorSpec([2], tf.int64)])
    def train_step_inputs(hr, seed):
        return degrade.apply("noisy", hr, 4, seed)

    inputs, _ = train_step_inputs(hr_batch, tf.constant([1, 2], tf.int64))
    eager, _ = degrade.apply("noisy", hr_batch, 4, [1, 2])
    np.testing.assert_allclose(inputs.numpy(), eager.numpy(), atol=1e-6)

    dataset = tf.data.Dataset.from_tensor_slices(hr_batch).map(
        lambda hr: degrade.apply("blur_downsample", hr, 8, seed=[0, 1]), num_parallel_calls=2
    )
    for lr, hr in dataset:
        assert lr.shape == (16, 16, 1) and hr.shape == (128, 128, 1)

    with pytest.raises(tf.errors.InvalidArgumentError, match="not a multiple of 4"):
        train_step_inputs(hr_batch[:, :30], tf.constant([1, 2], tf.int64))
