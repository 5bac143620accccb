"""A light residual CNN: five 3x3 convolutions with ReLU on the bicubic-upsampled image,
predicting the residual to add to it (the global residual learning of VDSR, Kim et al.,
CVPR 2016, at SRCNN's depth). A fast baseline and the cheapest model for edge devices.
"""

from sr_tf.models.blocks import (
    DEFAULT_FLAT_STD,
    ResidualOutput,
    SuperResolutionModel,
    bicubic_upsample,
    conv2d,
    gate_radius,
    serializable,
)


@serializable
class ResidualCNN(SuperResolutionModel):
    """``clip(bicubic(x) + gate * cnn(bicubic(x)))``: ``num_layers`` convs of ``filters``
    channels with ReLU, the last one linear to ``channels``. For scale 1 the base is the
    input itself. The gate fades the correction where the image is flat, and the clip to
    [0, 1] is straight-through while training (see ``ResidualOutput``)."""

    # Models saved before the flat-region gate existed add their correction everywhere.
    SAVED_BEFORE = {"flat_std": 0.0}

    def __init__(self, scale=4, channels=1, filters=64, num_layers=5, kernel_size=3, flat_std=DEFAULT_FLAT_STD,
                 **kwargs):
        super().__init__(scale=scale, channels=channels, **kwargs)
        if num_layers < 2:
            raise ValueError(f"num_layers must be at least 2, got {num_layers}")
        self.keep(filters=filters, num_layers=num_layers, kernel_size=kernel_size, flat_std=flat_std)
        self.convs = [conv2d(filters, kernel_size, activation="relu", name=f"conv_{i}") for i in range(num_layers - 1)]
        self.convs.append(conv2d(channels, kernel_size, name="residual"))
        self.to_output = ResidualOutput(flat_std, gate_radius(scale), dtype="float32", name="output")

    def call(self, inputs):
        base = bicubic_upsample(inputs, self.scale)
        x = base
        for conv in self.convs:
            x = conv(x)
        return self.to_output(base, x)
