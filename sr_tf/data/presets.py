"""The names of the degradation presets and of the scales they work at.

:mod:`sr_tf.data.degrade` implements them and is where callers find them
(``degrade.PRESETS``, ``degrade.SCALES`` are these tuples). They live apart because
this module imports nothing: front ends offer them as flag choices before the seconds
of importing TensorFlow.
"""

SCALES = (2, 4, 8)
PRESETS = ("bicubic", "blur_downsample", "noisy", "bilinear_artifacts", "self_supervised")
