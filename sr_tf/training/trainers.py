"""Trainers: Keras models whose ``train_step`` holds the whole update.

They are driven by :mod:`sr_tf.training.loop` through ``strategy.run(trainer.train_step,
...)`` for every strategy (docs/DESIGN.md, contract 7: the one training loop), so a step
returns plain tensors rather than updating Keras metric trackers: per-replica values
that the loop sums across replicas. Every loss is averaged over the GLOBAL batch
(``tf.nn.compute_average_loss``), and losses added with ``add_loss`` (the vector
quantiser's) are divided by the number of replicas, so the sum over replicas is the
mean over the global batch and gradients come out right under any strategy.

A batch is ``(lr, hr)``, or HR patches alone when degradation runs on the device:
then the trainer degrades them with the same ops the pipeline uses
(:func:`sr_tf.data.degrade.apply`), seeded by the step and the replica.
"""

import contextlib

import keras
import tensorflow as tf


def _replica_context():
    context = tf.distribute.get_replica_context()
    replica = context.replica_id_in_sync_group if context is not None else 0
    replicas = context.num_replicas_in_sync if context is not None else 1
    return replica, replicas


class WeightAverage(tf.Module):
    """An exponential moving average of a generator's trainable weights.

    ``update`` runs inside the train step, after the optimizer: every replica holds the
    same weights then, so the first replica's average is everyone's
    (``ONLY_FIRST_REPLICA``). The decay warms up as ``min(decay, (1 + t) / (10 + t))``
    after ``t`` updates (``tf.train.ExponentialMovingAverage``'s ``num_updates``), so a
    short run averages over its last few dozen steps rather than its random start.
    ``applied`` swaps the average into the model for evaluation or saving.
    """

    def __init__(self, variables, decay):
        super().__init__(name="weight_average")
        self.decay = float(decay)
        first = tf.VariableAggregation.ONLY_FIRST_REPLICA
        self.updates = tf.Variable(0, dtype=tf.int64, trainable=False, aggregation=first, name="updates")
        self.averages = [
            tf.Variable(tf.convert_to_tensor(v), trainable=False, aggregation=first, name=f"average_{i}")
            for i, v in enumerate(variables)
        ]

    def update(self, variables):
        self.updates.assign_add(1)
        count = tf.cast(self.updates, tf.float32)
        decay = tf.minimum(self.decay, (1.0 + count) / (10.0 + count))
        for average, variable in zip(self.averages, variables):
            average.assign(decay * average + (1.0 - decay) * tf.cast(variable, average.dtype))

    @contextlib.contextmanager
    def applied(self, variables):
        """Within the block, ``variables`` hold the averages; restored after."""
        saved = [tf.identity(v) for v in variables]
        for variable, average in zip(variables, self.averages):
            variable.assign(average)
        try:
            yield
        finally:
            for variable, value in zip(variables, saved):
                variable.assign(value)


class _Base(keras.Model):
    """Shared input handling, loss averaging and validation for both trainers."""

    def __init__(self, generator, pixel_loss, global_batch_size, perceptual_loss=None, ssim_loss=None,
                 tv_loss=None, degradation=None, scale=4, seed=0, weight_average=None, augment=False, **kwargs):
        super().__init__(**kwargs)
        # Kept out of Keras' attribute tracking: the loop checkpoints it itself.
        object.__setattr__(self, "weight_average", weight_average)
        self.generator = generator
        self.pixel_loss = pixel_loss
        self.perceptual_loss = perceptual_loss
        self.ssim_loss = ssim_loss
        self.tv_loss = tv_loss
        self.global_batch_size = int(global_batch_size)
        self.degradation = degradation  # preset name when degrading on the device
        self.scale = int(scale)
        self.seed = int(seed)
        self.augment = bool(augment)  # faint input noise on device-made inputs, as the pipeline adds it

    def call(self, inputs, training=False):
        return self.generator(inputs, training=training)

    def _batch(self, data, step):
        """``(lr, hr)`` from a pipeline batch; HR-only batches are degraded here, seeded
        by the step (the generator optimizer's iteration count) and the replica."""
        if self.degradation is None:
            return data
        from sr_tf.data import degrade

        replica, _ = _replica_context()
        seed = tf.stack([tf.cast(self.seed, tf.int64) * 1000003 + tf.cast(replica, tf.int64),
                         tf.cast(step, tf.int64)])
        lr, hr = degrade.apply(self.degradation, data, self.scale, tf.cast(seed, tf.int32))
        if self.augment:
            from sr_tf.data import augment

            lr = augment.lr_noise(lr, tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int32), 1))
        return lr, hr

    def _average(self, variables):
        if self.weight_average is not None:
            self.weight_average.update(variables)

    def _mean(self, per_sample):
        return tf.nn.compute_average_loss(per_sample, global_batch_size=self.global_batch_size)

    def _content_losses(self, hr, sr):
        """Pixel, perceptual, SSIM and TV terms, each averaged for the global batch."""
        losses = {"pixel": self._mean(self.pixel_loss(hr, sr))}
        if self.perceptual_loss is not None:
            losses["perceptual"] = self._mean(self.perceptual_loss(hr, sr))
        if self.ssim_loss is not None:
            losses["ssim_loss"] = self._mean(self.ssim_loss(hr, sr))
        if self.tv_loss is not None:
            losses["tv"] = self._mean(self.tv_loss(hr, sr))
        if self.generator.losses:
            # Vector-quantiser codebook/commitment terms: batch means per replica.
            losses["vq"] = tf.nn.scale_regularization_loss(tf.add_n([tf.cast(l, tf.float32) for l in self.generator.losses]))
        return losses


class SupervisedTrainer(_Base):
    """Pixel (+ optional perceptual/SSIM/TV, + quantiser) loss on the generator alone.

    Used for the residual CNN, the VQ autoencoder and the pixel-loss pre-training
    phase of SRResNet / Swift-SRGAN.
    """

    def compile(self, optimizer):
        super().compile()
        self.g_optimizer = optimizer

    def train_step(self, data):
        lr, hr = self._batch(data, self.g_optimizer.iterations)
        with tf.GradientTape() as tape:
            sr = tf.cast(self.generator(lr, training=True), tf.float32)
            losses = self._content_losses(hr, sr)
            total = tf.add_n(list(losses.values()))
            scaled = self.g_optimizer.scale_loss(total)
        variables = self.generator.trainable_variables
        grads = tape.gradient(scaled, variables)
        self.g_optimizer.apply(grads, variables)
        self._average(variables)
        return {"loss": total, **losses}


class GANTrainer(_Base):
    """Generator and discriminator updated in one step (SRGAN / Swift-SRGAN).

    Both losses come from the same forward pass; the discriminator sees the
    generator's output through ``stop_gradient``-free tapes that only differentiate
    its own variables.
    """

    def __init__(self, generator, discriminator, adversarial_loss, *args, **kwargs):
        super().__init__(generator, *args, **kwargs)
        self.discriminator = discriminator
        self.adversarial_loss = adversarial_loss

    def compile(self, g_optimizer, d_optimizer):
        super().compile()
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer

    def train_step(self, data):
        lr, hr = self._batch(data, self.g_optimizer.iterations)
        with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
            sr = tf.cast(self.generator(lr, training=True), tf.float32)
            real = tf.cast(self.discriminator(hr, training=True), tf.float32)
            fake = tf.cast(self.discriminator(sr, training=True), tf.float32)
            losses = self._content_losses(hr, sr)
            losses["adversarial"] = self._mean(self.adversarial_loss.generator(real, fake))
            g_total = tf.add_n(list(losses.values()))
            d_total = self._mean(self.adversarial_loss.discriminator(real, fake))
            g_scaled = self.g_optimizer.scale_loss(g_total)
            d_scaled = self.d_optimizer.scale_loss(d_total)
        g_vars = self.generator.trainable_variables
        d_vars = self.discriminator.trainable_variables
        g_grads = g_tape.gradient(g_scaled, g_vars)
        d_grads = d_tape.gradient(d_scaled, d_vars)
        self.d_optimizer.apply(d_grads, d_vars)
        self.g_optimizer.apply(g_grads, g_vars)
        self._average(g_vars)
        _, replicas = _replica_context()
        return {
            "loss": g_total,
            **losses,
            "d_loss": d_total,
            # Mean D(x) and D(G(z)) probabilities; divided so the replica sum is the mean.
            "d_real": tf.reduce_mean(tf.sigmoid(real)) / replicas,
            "d_fake": tf.reduce_mean(tf.sigmoid(fake)) / replicas,
        }
