"""sr_tf.inference: balanced tiles, tiled prediction, and the chain of wrappers around
a model (projection, self-ensemble) that every front end walks."""

import numpy as np
import pytest

from sr_tf import consistency, inference
from tests.sr_tf.predictors import Nearest


def repeat(array, scale=2):
    return np.repeat(np.repeat(array, scale, axis=-2), scale, axis=-1)


@pytest.mark.parametrize("size, tile, overlap, align", [
    (1024, 256, 40, 2), (1024, 512, 40, 2), (257, 256, 40, 2), (161, 100, 40, 1), (130, 48, 16, 4), (4096, 512, 40, 2),
])
def test_balanced_tiles_cover_the_image_in_as_many_tiles_with_the_overlap_kept(size, tile, overlap, align):
    balanced = inference.balanced_tile(size, tile, overlap, align)
    plain, even = inference.tile_origins(size, tile, overlap, align), inference.tile_origins(size, balanced, overlap, align)
    assert 2 * overlap < balanced <= tile and balanced % align == 0
    assert len(even) == len(plain)
    assert even[0] == 0 and even[-1] + balanced == size and all(o % align == 0 for o in even[:-1])
    assert all(a + balanced - b >= overlap for a, b in zip(even, even[1:]))  # neighbours share the overlap
    kept = [inference._keep_range(even, i, balanced, size) for i in range(len(even))]
    assert kept[0][0] == 0 and kept[-1][1] == size and all(a[1] == b[0] for a, b in zip(kept, kept[1:]))
    inner = [(lo - start, start + balanced - hi) for start, (lo, hi) in zip(even, kept)]
    assert all(top >= overlap // 2 for top, _ in inner[1:]) and all(bottom >= overlap // 2 for _, bottom in inner[:-1])



def test_tiled_predict_runs_fewer_pixels_with_balanced_tiles():
    """A 1024x1024 input in tiles of at most 256 (overlap 40): 25 tiles of 238, not of
    256; the stitched output is still every LR pixel in its place."""
    seen = []

    class Recording(Nearest):
        def predict(self, batch):
            seen.append(np.asarray(batch).shape)
            return super().predict(batch)

    image = np.random.default_rng(0).random((1024, 1024), np.float32)
    output = inference.tiled_predict(Recording(), image, tile=256, overlap=40, batch_size=4)
    assert sum(n for n, *_ in seen) == 25 and {shape[1:3] for shape in seen} == {(238, 238)}
    np.testing.assert_array_equal(output[..., 0], repeat(image))
    assert inference.tiled_predict(Recording(), image[:300, :200], tile=256, overlap=40).shape == (600, 400, 1)
    assert seen[-1][1:3] == (170, 200)  # one axis tiled, the other whole


def test_the_chain_of_wrappers_and_its_description():
    model = Nearest()
    projected = inference.ProjectedPredictor(model, consistency.Projection(scale=2, iterations=3, step=1.0))
    assert inference.chain(projected) == [projected, model] and inference.innermost(projected) is model
    assert inference.describe(model) == "the model nearest"
    assert inference.describe(projected).startswith("the model nearest, then ")
    other = Nearest()
    swapped = inference.replace_innermost(projected, other)
    assert inference.innermost(swapped) is other and inference.innermost(projected) is model  # a copy
    assert swapped.projection is projected.projection


def test_unknown_models_are_named(tmp_path):
    with pytest.raises(ValueError, match="no such model file or folder"):
        inference.load_predictor(tmp_path / "missing.keras")
    with pytest.raises(ValueError, match="not a model folder"):
        inference.load_predictor(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"\0")
    with pytest.raises(ValueError, match="unknown model format"):
        inference.load_predictor(tmp_path / "model.onnx")
