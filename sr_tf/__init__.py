"""sr_tf: super-resolution and artifact removal for medical images in TensorFlow/Keras.

Heavy submodules (models, training) are imported lazily by their users so that a
broken optional dependency never breaks ``import sr_tf``.
"""

__version__ = "0.1.0"
