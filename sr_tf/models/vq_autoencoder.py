"""A vector-quantised autoencoder that corrects the bicubic-upsampled image.

The LR input is interpolated to the HR size inside the model (bicubic; none for scale 1),
encoded by ``num_downsamples`` stride-2 4x4 convolutions and EDSR residual blocks,
quantised against a learned codebook, decoded by residual blocks and x2 sub-pixel
upsampling blocks (no transposed convolutions: no checkerboard artefacts), and added to
the interpolated image, so the network learns a correction. The encoder layout and the
codebook (512 entries of 64 dimensions, commitment weight 0.25) follow VQ-VAE (van den
Oord et al., 2017), with 128 hidden channels instead of 256 because every layer here runs
at HR size; ``filters=256`` gives the paper's width.

Any H and W: the interpolated image is padded (edge pixels repeated) to a multiple of the
encoder stride, and the output cropped back. The quantiser's codebook and commitment
losses are in ``model.losses`` after a call (see ``VectorQuantizer``).
"""

from keras import ops

from sr_tf.models.blocks import (
    DEFAULT_FLAT_STD,
    ResidualBlock,
    ResidualOutput,
    SuperResolutionModel,
    UpsampleBlock,
    VectorQuantizer,
    bicubic_upsample,
    conv2d,
    gate_radius,
    pad_to_multiple,
    serializable,
)


@serializable
class VQAutoencoder(SuperResolutionModel):
    """``clip(bicubic(x) + gate * decoder(quantise(encoder(bicubic(x)))))``: the gate fades
    the correction where the image is flat, the clip to [0, 1] is straight-through
    while training (see ``ResidualOutput``)."""

    # Models saved before the flat-region gate existed add their correction everywhere.
    SAVED_BEFORE = {"flat_std": 0.0}

    def __init__(
        self,
        scale=4,
        channels=1,
        filters=128,
        num_res_blocks=2,
        num_downsamples=2,
        codebook_size=512,
        embedding_dim=64,
        commitment_weight=0.25,
        ema=False,
        flat_std=DEFAULT_FLAT_STD,
        **kwargs,
    ):
        super().__init__(scale=scale, channels=channels, **kwargs)
        self.keep(filters=filters, num_res_blocks=num_res_blocks, num_downsamples=num_downsamples,
                  codebook_size=codebook_size, embedding_dim=embedding_dim, commitment_weight=commitment_weight,
                  ema=ema, flat_std=flat_std)

        def res_blocks(part):
            return [
                ResidualBlock(filters, batch_norm=False, activation="relu", name=f"{part}_block_{i}")
                for i in range(num_res_blocks)
            ]

        self.encoder = [
            conv2d(filters, 4, strides=2, activation="relu", name=f"down_{i}") for i in range(num_downsamples)
        ]
        self.encoder += res_blocks("encoder")
        self.encoder.append(conv2d(embedding_dim, 1, name="to_embedding"))
        self.quantizer = VectorQuantizer(
            codebook_size, embedding_dim, commitment_weight, ema=ema, dtype="float32", name="quantizer"
        )
        self.decoder = [conv2d(filters, 3, name="from_embedding")]
        self.decoder += res_blocks("decoder")
        self.decoder += [UpsampleBlock(filters, name=f"up_{i}") for i in range(num_downsamples)]
        self.decoder.append(conv2d(channels, 3, name="residual"))
        self.to_output = ResidualOutput(flat_std, gate_radius(scale), dtype="float32", name="output")

    def call(self, inputs):
        base = bicubic_upsample(inputs, self.scale)
        height, width = ops.shape(base)[1], ops.shape(base)[2]
        x = pad_to_multiple(base, 2**self.num_downsamples)
        for layer in self.encoder:
            x = layer(x)
        x = self.quantizer(x)
        for layer in self.decoder:
            x = layer(x)
        return self.to_output(base, x[:, :height, :width])
