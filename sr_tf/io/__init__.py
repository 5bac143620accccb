"""Image I/O: where bytes enter and leave the toolkit (docs/DESIGN.md).

- ``sr_tf.io.files``: atomic writes and checksums;
- ``sr_tf.io.readers``: DICOM (single, multi-frame, series), NIfTI and PNG/JPEG/TIFF
  files -> a :class:`~sr_tf.io.readers.Volume` of slices in physical units with their
  intensity window and what a writer needs to write the same format back;
- ``sr_tf.io.writers``: a volume's upscaled slices -> DICOM, NIfTI or PNG bytes;
- ``sr_tf.io.shards``: atomic, sharded TFRecords with a manifest;
- ``sr_tf.io.samples``: the embedded sample set and the development held-out set.

Training data (``sr_tf.conversion``), upscaling, evaluation and the app all read
through here, so one image reaches the model with one intensity mapping whichever way
it comes in.
"""
