"""The ``tf.data`` input pipeline: data_prep records -> (lr, hr) patch batches.

``make_dataset`` feeds training and validation; ``make_eval_dataset`` yields whole
images with their metadata for evaluation scripts.

Training (``split="train"``)::

    manifest shards -> per-pipeline share -> shuffled file order -> parallel interleaved
    reading -> parse + PNG decode (records.parse) -> drop images smaller than the patch
    -> optional in-memory cache of the decoded images -> repeat -> random crop that
    avoids near-empty patches -> random flip / 90-degree rotation -> [intensity and
    smoothness augmentation] -> shuffle -> batch (drop_remainder) -> degradation of the
    batch (sr_tf.data.degrade) -> [faint input noise] -> prefetch

The bracketed steps run with ``augment=True`` (``sr_tf.data.augment``).

Every random draw is stateless with a seed derived from ``seed``, the input pipeline
and the element's position in the stream, and every parallel stage keeps its order
when a seed is given, so one seed gives the same batches on every run. ``seed=None``
lets the parallel stages run out of order (a little faster, not repeatable).

Validation and test (any other split): no shuffle, no augmentation, no repeat unless
asked; centre crops of ``patch_size`` (or whole images cropped to a multiple of the
scale when ``patch_size=None``), and a degradation seed fixed by each image's
identity (``source`` and ``slice_index``), so every call, and every number of input
pipelines, gives the same inputs for the same image.

Images smaller than the patch cannot give a crop: they are left out of that dataset.
If none of the images (of an input pipeline's share) is large enough, ``DatasetError``
says so, naming the largest size found, instead of a pipeline that waits forever.
"""

import os
import random

import tensorflow as tf

from sr_tf import intensity, records
from sr_tf.data import augment as augmentation
from sr_tf.data import degrade

AUTOTUNE = tf.data.AUTOTUNE

DEFAULT_SHUFFLE_BUFFER = 512  # HR patches, about 19 MB at patch 96
# A patch whose standard deviation (in [0, 1] units) is below this is "empty". 0.001
# is 4 HU on the default CT window: it rejects padding, air clipped to the window
# floor and the zero background of MR, and keeps low-contrast soft tissue (brain
# parenchyma patches measure about 0.0015-0.003).
DEFAULT_MIN_PATCH_STD = 0.001
DEFAULT_MAX_CROP_TRIES = 10
# cache="auto" keeps decoded images in memory when a pipeline's shards total at most
# this many MB on disk (decoded 16-bit images take about 2-4 times their PNG size).
CACHE_AUTO_LIMIT_MB = 256
# Shards read at once. A fixed number, not AUTOTUNE, so that the record order (and
# with it the batches of a seed) does not depend on the machine's core count.
INTERLEAVE_CYCLE = 8


class DatasetError(records.RecordsError):
    """The requested dataset cannot be built from this records folder with these options."""


# ----------------------------------------------------------------------------- public API


def make_dataset(
    records_dir,
    split,
    scale,
    patch_size,
    batch_size,
    degradation="bicubic",
    seed=0,
    hr_only=False,
    input_context=None,
    shuffle_buffer=DEFAULT_SHUFFLE_BUFFER,
    min_patch_std=DEFAULT_MIN_PATCH_STD,
    max_crop_tries=DEFAULT_MAX_CROP_TRIES,
    repeat=None,
    cache="auto",
    augment=False,
    verify_checksums=True,
):
    """Batches of ``(lr, hr)`` float32 in [0, 1] from a data_prep output folder.

    Args:
      records_dir: folder with ``manifest.json`` and the shards it lists.
      split: ``train`` (random patches, augmented, shuffled, repeated) or ``val`` /
        ``test`` (deterministic centre crops, see the module doc).
      scale: 2, 4 or 8.
      patch_size: HR crop size, a multiple of ``degrade.target_divisor(degradation,
        scale)``. ``None`` (not for training) gives whole images, centre-cropped to that
        multiple, one per batch.
      batch_size: the GLOBAL batch size; with ``input_context`` each pipeline batches
        ``input_context.get_per_replica_batch_size(batch_size)``.
      degradation: one of ``degrade.PRESETS``. ``lr`` is ``hr`` reduced by
        ``degrade.model_scale(degradation, scale)``: shapes ``(B, p/s', p/s', 1)`` and
        ``(B, p', p', 1)``, where ``p'`` is ``p / scale`` for ``self_supervised``.
      seed: int; None gives training a non-repeatable order with faster parallel
        stages (other splits then use seed 0: they are always repeatable).
      hr_only: yield HR patches ``(B, p, p, 1)`` only, for a train step that degrades
        on the accelerator with ``degrade.apply``.
      input_context: a ``tf.distribute.InputContext`` (from
        ``strategy.distribute_datasets_from_function``): this pipeline reads every
        ``num_input_pipelines``-th shard, or every ``num_input_pipelines``-th record
        when there are fewer shards than pipelines.
      shuffle_buffer: patches in the shuffle buffer (training).
      min_patch_std: a training crop with a lower standard deviation is retried.
      max_crop_tries: crops tried per patch; when all are below ``min_patch_std`` the
        one with the highest standard deviation is kept.
      repeat: None repeats training forever and reads other splits once; True repeats
        forever, False reads once, an int n reads n times.
      cache: True keeps the decoded images (training) or the finished examples (other
        splits) in memory after the first pass, False never, ``"auto"`` when the shards
        read are at most ``CACHE_AUTO_LIMIT_MB``.
      verify_checksums: check every shard's SHA-256 against the manifest first (sizes
        are always checked); False skips the hashing for very large data.
      augment: training only: random intensity changes and smooth targets for the HR
        patches and faint noise on the inputs (``sr_tf.data.augment``); with
        ``hr_only`` the input noise is left to the device step (the trainers add it).

    Raises:
      records.RecordsError: the folder or its manifest is missing or unreadable.
      DatasetError: bad options, an empty split, or no image as large as the patch.
    """
    training = split == "train"
    divisor = _check_options(records_dir, split, scale, patch_size, batch_size, degradation, training)
    if training:
        if not 0 < max_crop_tries:
            raise DatasetError(f"max_crop_tries must be at least 1, got {max_crop_tries}")
        if shuffle_buffer < 1:
            raise DatasetError(f"shuffle_buffer must be at least 1, got {shuffle_buffer}")
    per_replica = batch_size if input_context is None else input_context.get_per_replica_batch_size(batch_size)
    if patch_size is None and per_replica != 1:
        raise DatasetError(
            f"whole images (patch_size=None) differ in size: use 1 image per replica, got {per_replica}"
        )
    share = _Share(records_dir, split, input_context, verify_checksums)
    if seed is None and not training:
        seed = 0  # evaluation batches are always repeatable
    deterministic = seed is not None
    seed = random.SystemRandom().randrange(2**31) if seed is None else int(seed)
    # Training draws differ per input pipeline; evaluation degradations depend on the image only.
    base_seed = tf.random.experimental.stateless_fold_in(
        degrade.as_seed(seed), share.pipeline_index if training else 0
    )
    use_cache = share.cache_wanted(cache)
    passes = _passes(training if repeat is None else repeat)

    smallest = patch_size or divisor
    share.require_image_of(smallest)
    images = share.records(shuffle_files=training, deterministic=deterministic, seed=seed)
    images = images.map(_decode, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    images = images.filter(lambda example: _at_least(example["image_uint16"], smallest))

    if training:
        images = images.map(lambda example: example["image_uint16"])
        if use_cache:
            images = images.cache()
        crop_seed, degrade_seed = _derive_seeds(base_seed, 2)
        augment_seed, noise_seed = _derive_seeds(tf.random.experimental.stateless_fold_in(base_seed, 0x5EED), 2)

        def random_patch(index, image):
            seed_crop, seed_flip = _derive_seeds(crop_seed, 2, index)
            seed_intensity, seed_smooth = _derive_seeds(augment_seed, 2, index)
            hr = _random_crop(image, patch_size, min_patch_std, max_crop_tries, seed_crop)
            hr = _random_dihedral(hr, seed_flip)
            if augment:
                hr = augmentation.smooth(augmentation.intensity(hr, seed_intensity), scale, seed_smooth)
            return hr

        patches = images.repeat(passes).enumerate()
        patches = patches.map(random_patch, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
        patches = patches.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        batches = patches.batch(per_replica, drop_remainder=True)
        if not hr_only:
            # Degrading whole batches is several times faster than one patch at a time;
            # every image of the batch still draws its own blur and noise levels.
            def degrade_batch(index, hr):
                batch_seed = tf.random.experimental.stateless_fold_in(degrade_seed, index)
                lr, hr = degrade.apply(degradation, hr, scale, batch_seed)
                if augment:
                    lr = augmentation.lr_noise(lr, tf.random.experimental.stateless_fold_in(noise_seed, index))
                return lr, hr

            batches = batches.enumerate()
            batches = batches.map(degrade_batch, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    else:

        def center_example(example):
            hr = _center_crop(example["image_uint16"], patch_size, divisor)
            if hr_only:
                return hr
            return degrade.apply(degradation, hr, scale, image_seed(base_seed, example))

        examples = images.map(center_example, num_parallel_calls=AUTOTUNE, deterministic=True)
        if use_cache:
            examples = examples.cache()
        batches = examples.repeat(passes).batch(per_replica, drop_remainder=False)
    return _with_options(batches.prefetch(AUTOTUNE), deterministic)


def make_eval_dataset(records_dir, split="test", multiple_of=1, input_context=None, verify_checksums=True):
    """Whole images of ``split`` with their metadata, one at a time, in a fixed order.

    Each element is the ``records.parse`` dict (``image`` float32 (H, W, 1) in [0, 1],
    ``image_uint16``, ``modality``, ``source``, ``patient_id``, ``slice_index``,
    ``pixel_spacing``, ``intensity_min``, ``intensity_max``, ``split``, ...). With
    ``multiple_of`` > 1 both images are centre-cropped to the largest multiple of it;
    ``height`` and ``width`` are then the cropped size and ``crop_offset`` (row, col)
    says where the crop starts in the stored image. ``input_context`` shares the
    records among input pipelines as ``make_dataset`` does; ``verify_checksums`` as there.
    """
    if split not in records.SPLITS:
        raise DatasetError(f"split must be one of {records.SPLITS}, got {split!r}")
    if not isinstance(multiple_of, int) or multiple_of < 1:
        raise DatasetError(f"multiple_of must be a positive int, got {multiple_of!r}")
    share = _Share(records_dir, split, input_context, verify_checksums)
    examples = share.records(shuffle_files=False, deterministic=True, seed=0)
    examples = examples.map(records.parse, num_parallel_calls=AUTOTUNE, deterministic=True)
    if multiple_of > 1:
        share.require_image_of(multiple_of)
        examples = examples.filter(lambda example: _at_least(example["image_uint16"], multiple_of))

        def crop(example):
            size = _largest_multiple(example["image_uint16"], multiple_of)
            stored, offset = _center_slice(example["image_uint16"], size)
            cropped = dict(example, image_uint16=stored, image=intensity.stored_to_unit(stored))
            cropped.update(height=tf.cast(size[0], tf.int64), width=tf.cast(size[1], tf.int64))
            cropped["crop_offset"] = tf.cast(offset, tf.int64)
            return cropped

        examples = examples.map(crop, num_parallel_calls=AUTOTUNE, deterministic=True)
    return _with_options(examples.prefetch(AUTOTUNE), deterministic=True)


# ----------------------------------------------------------------------------- checks


def _check_options(records_dir, split, scale, patch_size, batch_size, degradation, training):
    """Validate the plain arguments; returns the size divisor of the preset."""
    if split not in records.SPLITS:
        raise DatasetError(f"{records_dir}: split must be one of {records.SPLITS}, got {split!r}")
    if degradation not in degrade.PRESETS:
        raise DatasetError(f"unknown degradation preset {degradation!r}; choose one of {degrade.PRESETS}")
    if scale not in degrade.SCALES:
        raise DatasetError(f"scale must be one of {degrade.SCALES}, got {scale!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DatasetError(f"batch_size must be a positive int, got {batch_size!r}")
    divisor = degrade.target_divisor(degradation, scale)
    if patch_size is None:
        if training:
            raise DatasetError("training needs a patch_size; patch_size=None (whole images) is for val/test")
    elif not isinstance(patch_size, int) or patch_size < 1 or patch_size % divisor:
        raise DatasetError(
            f"patch_size {patch_size!r} must be a positive multiple of {divisor} "
            f"(degradation {degradation!r} at scale {scale})"
        )
    return divisor


class _Share:
    """The shards (or records) of one split that one input pipeline reads."""

    def __init__(self, records_dir, split, input_context, verify_checksums=True):
        self.records_dir = os.fspath(records_dir)
        self.split = split
        manifest = records.read_manifest(self.records_dir)
        files = records.shard_files(self.records_dir, split, manifest, checksums=verify_checksums)
        if records.record_count(self.records_dir, split, manifest) == 0 or not files:
            raise DatasetError(
                f"{self.records_dir}: split {split!r} has no records (manifest counts: {manifest.get('counts')})"
            )
        if input_context is None:
            self.pipelines, self.pipeline_index = 1, 0
        else:
            self.pipelines = input_context.num_input_pipelines
            self.pipeline_index = input_context.input_pipeline_id
        # shard_files keeps the manifest's order, so the split's shard entries pair up.
        shards = [shard for shard in manifest["shards"] if shard["split"] == split]
        sizes = dict(zip(files, (shard.get("bytes", 0) for shard in shards)))
        # Shard by file when every pipeline gets one (the same as Dataset.shard on the
        # file list); otherwise every pipeline reads all files and keeps its records.
        self.by_file = len(files) >= self.pipelines
        if self.by_file:
            self.files = files[self.pipeline_index :: self.pipelines]
            self.bytes = sum(sizes[f] for f in self.files)
        else:
            self.files = files
            self.bytes = sum(sizes.values()) // self.pipelines

    def cache_wanted(self, cache):
        if cache == "auto":
            return self.bytes <= CACHE_AUTO_LIMIT_MB * 2**20
        if isinstance(cache, bool):
            return cache
        raise DatasetError(f"cache must be True, False or 'auto', got {cache!r}")

    def records(self, shuffle_files, deterministic, seed):
        """Serialized records of this share, read from up to INTERLEAVE_CYCLE shards at once."""
        files = tf.data.Dataset.from_tensor_slices(self.files)
        if shuffle_files and self.by_file and len(self.files) > 1:
            files = files.shuffle(len(self.files), seed=seed, reshuffle_each_iteration=True)
        serialized = files.interleave(
            tf.data.TFRecordDataset,
            cycle_length=min(len(self.files), INTERLEAVE_CYCLE),
            num_parallel_calls=AUTOTUNE,
            # Record-level sharding needs one record order in every pipeline.
            deterministic=deterministic or not self.by_file,
        )
        if not self.by_file:
            serialized = serialized.shard(self.pipelines, self.pipeline_index)
        return serialized

    def require_image_of(self, size):
        """DatasetError unless some image of the share is at least ``size`` x ``size``.

        Reads only the size features and stops at the first image large enough; reads
        the whole share only to report a failure. Skipped when building inside a
        graph, where nothing can be iterated.
        """
        if not tf.executing_eagerly():
            return
        spec = {key: records.feature_spec()[key] for key in ("height", "width")}

        def image_shape(serialized):
            sizes = tf.io.parse_single_example(serialized, spec)
            return tf.cast(tf.stack([sizes["height"], sizes["width"]]), tf.int32)

        shapes = self.records(shuffle_files=False, deterministic=True, seed=0).map(image_shape)
        if any(True for _ in shapes.filter(lambda shape: tf.reduce_all(shape >= size)).take(1)):
            return
        largest = shapes.reduce(tf.zeros([2], tf.int32), lambda best, shape: tf.maximum(best, shape)).numpy()
        where = f"{self.records_dir}, split {self.split!r}"
        if self.pipelines > 1:
            where += f", input pipeline {self.pipeline_index} of {self.pipelines}"
        raise DatasetError(
            f"{where}: no image is at least {size}x{size} pixels (largest height {largest[0]}, "
            f"largest width {largest[1]}); use a smaller patch_size"
        )


def _passes(repeat):
    """``Dataset.repeat`` count: True -> forever (-1), False -> once, n -> n."""
    if isinstance(repeat, bool):
        return -1 if repeat else 1
    if isinstance(repeat, int) and repeat >= 1:
        return repeat
    raise DatasetError(f"repeat must be None, True, False or an int >= 1, got {repeat!r}")


# ----------------------------------------------------------------------------- element ops


def _decode(serialized):
    example = records.parse(serialized)
    return {key: example[key] for key in ("image_uint16", "source", "slice_index")}


def _at_least(image, size):
    shape = tf.shape(image)
    return tf.logical_and(shape[0] >= size, shape[1] >= size)


def _random_crop(image, size, min_std, max_tries, seed):
    """A ``size`` crop of uint16 ``image`` whose std reaches ``min_std``, tried up to
    ``max_tries`` times; the crop with the highest std when none does."""
    limits = tf.cast(tf.shape(image)[:2] - size + 1, tf.float32)

    def crop(attempt):
        uniform = tf.random.stateless_uniform([2], tf.random.experimental.stateless_fold_in(seed, attempt))
        corner = tf.cast(tf.floor(uniform * limits), tf.int32)
        patch = intensity.stored_to_unit(tf.slice(image, tf.concat([corner, [0]], 0), [size, size, 1]))
        return patch, tf.math.reduce_std(patch)

    def keep_trying(attempt, _, best_std):
        return tf.logical_and(attempt < max_tries, best_std < min_std)

    def try_again(attempt, best, best_std):
        patch, std = crop(attempt)
        better = std > best_std
        return attempt + 1, tf.where(better, patch, best), tf.where(better, std, best_std)

    first, first_std = crop(0)
    _, best, _ = tf.while_loop(keep_trying, try_again, (tf.constant(1), first, first_std))
    return tf.ensure_shape(best, [size, size, 1])


def _random_dihedral(patch, seed):
    """One of the 8 flips / 90-degree rotations, drawn from ``seed``."""
    rotate_seed, flip_seed = _derive_seeds(seed, 2)
    turns = tf.random.stateless_uniform([], rotate_seed, minval=0, maxval=4, dtype=tf.int32)
    patch = tf.image.rot90(patch, turns)
    return tf.image.stateless_random_flip_left_right(patch, flip_seed)


def _largest_multiple(image, multiple):
    """(height, width) of ``image`` rounded down to multiples of ``multiple``."""
    return tf.shape(image)[:2] // multiple * multiple


def _center_slice(image, size):
    """The centred ``size`` (height, width) window of ``image`` and its (row, col) offset."""
    offset = (tf.shape(image)[:2] - size) // 2
    return tf.slice(image, tf.concat([offset, [0]], 0), tf.concat([size, [1]], 0)), offset


def _center_crop(image, patch_size, divisor):
    """Centre ``patch_size`` crop of uint16 ``image`` (the whole image cropped to a
    multiple of ``divisor`` when ``patch_size`` is None), as float32 in [0, 1]."""
    size = _largest_multiple(image, divisor) if patch_size is None else tf.fill([2], patch_size)
    crop, _ = _center_slice(image, size)
    return tf.ensure_shape(intensity.stored_to_unit(crop), [patch_size, patch_size, 1])


def _derive_seeds(seed, count, index=None):
    """``count`` independent seeds from ``seed``, folded with an element ``index`` if given."""
    if index is not None:
        seed = tf.random.experimental.stateless_fold_in(seed, index)
    return tf.unstack(tf.random.experimental.stateless_split(seed, count))


def image_seed(base_seed, example):
    """A degradation seed fixed by the image's identity, whatever the reading order."""
    identity = tf.strings.join([example["source"], tf.strings.as_string(example["slice_index"])], "#")
    return tf.random.experimental.stateless_fold_in(base_seed, tf.strings.to_hash_bucket_fast(identity, 2**62))


def _with_options(dataset, deterministic):
    options = tf.data.Options()
    options.deterministic = deterministic
    return dataset.with_options(options)
