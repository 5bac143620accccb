"""Upscale DICOM, NIfTI and PNG/JPEG/TIFF files with a trained model, in their own format.

    predictor = inference.load_predictor("runs/swift_srgan_x4")
    predictor = inference.with_consistency(predictor, "project")   # data-consistency projection
    image = upscaling.load("ct.dcm")                      # slices (S, H, W) in [0, 1]
    sr = upscaling.upscale(predictor, image)              # (S, 4H, 4W) in [0, 1], tiled
    upscaling.write(image, sr, predictor, "out/ct_x4.dcm")

Intensities. The model sees what it was trained on: physical values (HU, detector value
with dense bright, MR signal) mapped linearly from the modality's default window
``[lo, hi]`` (docs/DESIGN.md, contract 1: CT -1024..3071 HU, X-ray 0..2**BitsStored-1,
MR and others 0..99.9th percentile) to [0, 1]. A wider window (say the whole stored range of a
16-bit CT) would squeeze the contrast the model learned. Values outside the window are
not lost: :class:`Image` keeps them, and the writers carry them into the output by
nearest neighbour (each output pixel whose source pixel lay outside the window gets that
source value: padding at -3024 HU, metal above 3071 HU, the brightest 0.1 % of an MR),
so a DICOM or NIfTI output holds every input value range and nothing is clipped but to
what the output's stored type can hold. PNG output is the window itself (8- and 16-bit
inputs have nothing outside it).

Writing back. DICOM: the original stored representation (bits, signedness, rescale or
Modality LUT, MONOCHROME1 polarity), uncompressed Explicit VR Little Endian, new SOP
Instance UID and a new Series Instance UID derived from the original one, the model and
the scale (so the files of one series upscaled by one model form one new series),
ImageType DERIVED\\SECONDARY, a DerivationDescription naming the model (and the
data-consistency projection when the predictor applies one: ``sr_tf.consistency``), pixel
spacing divided by the scale and ImagePositionPatient moved so that the image's outer
corner stays where it was. NIfTI: the original array
layout and orientation (never reoriented): the two in-plane voxel axes (those other than
the header's slice dimension, axis 2 when unset) are upscaled, the others kept, the
sform/qform rescaled so the grid covers the same field of view in world coordinates, the
dtype and scl_slope/scl_inter kept. Raster: PNG of the input's bit depth (8 or 16),
grayscale.

Outputs are written under a temporary name and renamed, and never over their input.
"""

import copy
import dataclasses
import gzip
import io
import os
import time

import numpy as np

from sr_tf.io import readers
from sr_tf import inference, intensity
from sr_tf.io import files

# Elements computed from the old pixel data, or describing its encoding, that no longer hold.
_STALE_DICOM = (
    "SmallestImagePixelValue", "LargestImagePixelValue", "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
)
# Colour input becomes one luminance sample; these describe colour pixel data.
_COLOUR_DICOM = ("PlanarConfiguration", "ICCProfile", "ColorSpace")
_SPACINGS = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")
_ROW_BLOCK = 64  # LR rows converted to the output type at a time (bounds float64 temporaries)


class UpscaleError(ValueError):
    """An input that cannot be upscaled or written; the message names the file and the reason."""


@dataclasses.dataclass
class Image:
    """One input file, loaded: the model's input and what writing it back needs."""

    path: str
    kind: str  # "dicom" | "nifti" | "raster"
    slices: np.ndarray  # (S, H, W) float32 in [0, 1]: (physical - lo) / (hi - lo), clipped
    lo: float  # physical value mapped to 0
    hi: float  # physical value mapped to 1
    modality: str  # "CT", "CR", "DX", "MR", ...
    pixel_spacing: tuple  # (row, col) mm, (0, 0) when unknown
    source: object  # pydicom Dataset, nibabel image, or {"bits": 8 | 16} for a raster
    # (S, H, W) float32 physical values when some lie outside [lo, hi] (carried into the
    # output by nearest neighbour), else None.
    physical: np.ndarray = None


# ----------------------------------------------------------------------------- loading


def load(path):
    """Load one DICOM, NIfTI or PNG/JPEG/TIFF file; UpscaleError("<path>: <reason>") if it cannot be."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UpscaleError(f"{path}: no such file")
    kind = readers.detect_format(path)
    if kind is None:
        raise UpscaleError(f"{path}: unknown format (expected DICOM, NIfTI .nii/.nii.gz, or PNG/JPEG/TIFF)")
    try:
        return _LOADERS[kind](path)
    except (readers.InputError, ValueError) as exc:
        raise UpscaleError(f"{path}: {exc}") from exc


def _image(path, kind, physical, window, modality, pixel_spacing, source, keep_outside=True):
    physical = np.asarray(physical, np.float32)
    lo, hi = (float(v) for v in window)
    slices = np.subtract(physical, np.float32(lo))
    slices /= np.float32(hi - lo)
    np.clip(slices, 0.0, 1.0, out=slices)
    outside = keep_outside and bool(np.any((physical < lo) | (physical > hi)))
    return Image(path, kind, slices, lo, hi, modality, tuple(float(v) for v in pixel_spacing), source,
                 physical if outside else None)


def _load_dicom(path):
    ds = readers.dicom_dataset(path)
    if "PixelData" in ds:
        _check_writable(ds)
    frames = readers.dicom_to_physical(ds, path)
    if "PixelData" not in ds:  # float pixel data decodes, but is not written back
        raise readers.InputError("float pixel data (FloatPixelData / DoubleFloatPixelData) is not supported")
    modality = str(ds.get("Modality", "OT") or "OT").upper()
    window = readers.dicom_default_range(ds, modality, frames)
    return _image(path, "dicom", np.stack(frames), window, modality, readers.dicom_pixel_spacing(ds), ds)


def _check_writable(ds):
    bits = int(ds.get("BitsAllocated", 0))
    if bits not in (8, 16, 32):
        raise readers.InputError(f"BitsAllocated {bits} (e.g. a binary segmentation) cannot be upscaled")


def _load_nifti(path):
    import nibabel as nib

    try:
        image = nib.load(path)
        if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
            raise readers.InputError(f"{type(image).__name__} is not a NIfTI volume")
        if len(image.shape) >= 2:
            a, b, _ = _nifti_axes(image.header, len(image.shape))
            readers.check_pixel_count(image.shape[b], image.shape[a], what="a slice")
        readers.check_nifti_size(image, path)
        data = image.get_fdata(dtype=np.float32, caching="unchanged")
    except readers.InputError:
        raise
    except Exception as exc:
        raise readers.InputError(f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    if data.ndim < 2 or data.size == 0:
        raise readers.InputError(f"zero-size or 1-D image {data.shape}")
    if not np.all(np.isfinite(data)):
        raise readers.InputError(f"contains {int(np.count_nonzero(~np.isfinite(data)))} NaN or Inf voxel(s)")
    axes = _nifti_axes(image.header, data.ndim)
    modality = "CT" if readers.looks_like_ct(data) else "MR"
    window = intensity.CT_RANGE if modality == "CT" else intensity.percentile_range(data)
    zooms = image.header.get_zooms()
    spacing = (zooms[axes[1]], zooms[axes[0]])
    return _image(path, "nifti", _nifti_to_slices(data, axes), window, modality, spacing, image)


def _load_raster(path):
    volume = readers.read_raster(path)
    # read_raster gives exactly [0, 255] / [0, 65535] for 8- / 16-bit input; anything
    # else (float or 32-bit TIFF) is written as a 16-bit PNG of its window.
    bits = 8 if tuple(volume.intensity_range) == intensity.xray_range(8) else 16
    return _image(path, "raster", np.stack(volume.slices), volume.intensity_range, volume.modality,
                  volume.pixel_spacing, {"bits": bits}, keep_outside=False)


_LOADERS = {"dicom": _load_dicom, "nifti": _load_nifti, "raster": _load_raster}


# ----------------------------------------------------------------------------- NIfTI layout


def _nifti_axes(header, ndim):
    """``(a, b, c)``: the in-plane voxel axes a < b that are upscaled and the slice axis c
    (the header's slice dimension when set, else 2; None for a 2-D image)."""
    if ndim == 2:
        return 0, 1, None
    slice_dim = header.get_dim_info()[2]
    c = slice_dim if slice_dim in (0, 1, 2) else 2
    a, b = (axis for axis in range(3) if axis != c)
    return a, b, c


def _nifti_order(ndim, axes):
    """Axis order that puts volumes (dims 4+) first, then slices, then the in-plane axes."""
    a, b, c = axes
    return [*range(3, ndim), *([] if c is None else [c]), a, b]


def _nifti_to_slices(data, axes):
    """(S, H, W) slices of the original array, slice s = volume * depth + index along c;
    rotated like data_prep's NIfTI slices (rows along axis b, reversed; columns along a)."""
    moved = np.transpose(data, _nifti_order(data.ndim, axes))
    stack = moved.reshape(-1, data.shape[axes[0]], data.shape[axes[1]])
    return np.rot90(stack, 1, axes=(1, 2))


def _slices_to_nifti(stack, shape, axes):
    """Inverse of :func:`_nifti_to_slices` for an array of the given original-order ``shape``."""
    order = _nifti_order(len(shape), axes)
    moved = np.rot90(stack, -1, axes=(1, 2)).reshape([shape[i] for i in order])
    return np.transpose(moved, np.argsort(order))


# ----------------------------------------------------------------------------- inference


def _indices(image, slices):
    count = image.slices.shape[0]
    if slices is None:
        return list(range(count))
    indices = [int(k) for k in slices]
    bad = [k for k in indices if not 0 <= k < count]
    if bad or not indices:
        raise UpscaleError(f"{image.path}: slice indices {bad or indices} out of range for {count} slice(s)")
    return indices


def upscale(predictor, image, tile=inference.DEFAULT_TILE, overlap=inference.DEFAULT_OVERLAP,
            batch_size=inference.DEFAULT_BATCH, slices=None, progress=None, uncertainty=False):
    """Super-resolve the slices of ``image`` (all, or the indices in ``slices``) with tiled
    inference; returns (S', s*H, s*W) float32 in [0, 1]. ``progress(done, total)`` counts
    tiles over all the slices.

    ``uncertainty=True`` (``predictor`` an ``sr_tf.ensemble.EnsemblePredictor`` with
    ``spread=True``, possibly projected) returns ``(upscaled, uncertainty)``, the second
    the uncertainty map of each slice (``sr_tf.ensemble.uncertainty``), same shape.
    """
    indices = _indices(image, slices)
    if uncertainty:
        from sr_tf import ensemble
        from sr_tf.data import degrade

        kernel = degrade.consistency_kernel(inference.degradation_of(inference.innermost(predictor)))
        maps = None
    out = None
    for i, k in enumerate(indices):
        per_slice = None
        if progress is not None:
            def per_slice(done, total, i=i):
                progress(i * total + done, len(indices) * total)
        result = inference.tiled_predict(predictor, image.slices[k], tile, overlap, batch_size, progress=per_slice)
        if not np.isfinite(result).all():
            raise UpscaleError(f"{image.path}: the model produced NaN or Inf (slice {k}); nothing written")
        if uncertainty and result.shape[-1] != 2:
            raise UpscaleError(f"{image.path}: an uncertainty map needs the self-ensemble's spread (--ensemble)")
        spread = result[..., 1] if uncertainty else None
        result = np.clip(result[..., 0], 0.0, 1.0)
        if out is None:
            out = np.empty((len(indices), *result.shape), np.float32)
            if uncertainty:
                maps = np.empty_like(out)
        out[i] = result
        if uncertainty:
            maps[i] = ensemble.uncertainty(image.slices[k], result, spread, predictor.scale, kernel)
    return (out, maps) if uncertainty else out


# ----------------------------------------------------------------------------- back to physical values


def _physical(image, rows, index, first_row, scale):
    """Physical values (as loaded) of upscaled ``rows`` of slice ``index``, starting at LR row
    ``first_row``: the model output through [lo, hi], and the input's values outside [lo, hi]
    carried over by nearest neighbour (see the module docstring)."""
    values = rows.astype(np.float64) * (image.hi - image.lo) + image.lo
    if image.physical is not None:
        source = image.physical[index, first_row:first_row + rows.shape[0] // scale]
        outside = (source < image.lo) | (source > image.hi)
        blocks = values.reshape(source.shape[0], scale, source.shape[1], scale)
        np.copyto(blocks, source[:, None, :, None], where=outside[:, None, :, None])
    return values


def _to_output(image, upscaled, indices, scale, convert, dtype):
    """Upscaled slices in the output's stored ``dtype``: physical values (:func:`_physical`)
    passed through ``convert(values, slice_index)``, a block of rows at a time."""
    out = np.empty(upscaled.shape, dtype)
    block = _ROW_BLOCK * scale
    for i, k in enumerate(indices):
        for start in range(0, upscaled.shape[1], block):
            values = _physical(image, upscaled[i, start:start + block], k, start // scale, scale)
            out[i, start:start + block] = convert(values, k)
    return out


def _rounded(values, lo, hi, dtype):
    """Round to integers, clip to [lo, hi] and cast (floats are only cast)."""
    if np.issubdtype(dtype, np.integer):
        values = np.clip(np.rint(values), lo, hi)
    return values.astype(dtype)


def _check_shape(image, upscaled, indices, scale):
    expected = (len(indices), image.slices.shape[1] * scale, image.slices.shape[2] * scale)
    if upscaled.shape != expected:
        raise UpscaleError(f"{image.path}: upscaled shape {upscaled.shape} does not match {expected} "
                           f"({len(indices)} slice(s) x{scale})")


# ----------------------------------------------------------------------------- DICOM


def _dicom_converter(ds):
    """``convert(values, frame)``: physical values as loaded -> stored values, inverting what
    the readers did (modality LUT per frame, MONOCHROME1 inversion), clipped to the bits."""
    low, high = readers.stored_value_range(ds)
    bits = int(ds.BitsAllocated)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    if int(ds.get("SamplesPerPixel", 1)) == 3:  # luminance, no modality LUT on load
        return lambda values, frame: _rounded(values, low, high, dtype), dtype
    if "ModalityLUTSequence" in ds:
        stored = np.arange(low, high + 1)
        table = readers.modality_lut([stored], ds)[0]
        if np.any(np.diff(table) < 0):
            raise readers.InputError("a non-monotonic Modality LUT cannot be inverted to write values back")
        flip = table[0] + table[-1]

        def to_stored(values, frame):
            return np.interp(values, table, stored)
    else:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        ends = np.array([low, high], np.float64)
        mapped = np.array(readers.modality_lut([ends] * frames, ds))  # (frames, 2): the LUT at both ends
        slopes = (mapped[:, 1] - mapped[:, 0]) / (high - low)
        if np.any(slopes == 0):
            raise readers.InputError("RescaleSlope 0: stored values cannot be recovered")
        intercepts = mapped[:, 0] - slopes * low
        flip = mapped[0].sum()

        def to_stored(values, frame):
            return (values - intercepts[frame]) / slopes[frame]
    monochrome1 = str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1"

    def convert(values, frame):
        if monochrome1:  # the readers inverted within the LUT-mapped stored range (frame 0)
            values = flip - values
        return _rounded(to_stored(values, frame), low, high, dtype)

    return convert, dtype


def _ds_number(value):
    from pydicom.valuerep import DSfloat

    return DSfloat(float(value), auto_format=True)


def _move_positions(ds, scale):
    """ImagePositionPatient is the centre of the first pixel: move it by half an old pixel
    minus half a new one along rows and columns, so the image's outer corner stays put.
    Runs before the spacings are divided (it needs the old ones)."""

    def move(item, orientation, spacing):
        if "ImagePositionPatient" not in item or orientation is None or len(orientation) != 6 or not all(spacing):
            return
        row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
        shift = -(1.0 - 1.0 / scale) / 2.0 * (spacing[1] * row_dir + spacing[0] * col_dir)
        item.ImagePositionPatient = [_ds_number(v) for v in np.asarray(item.ImagePositionPatient, float) + shift]

    move(ds, ds.get("ImageOrientationPatient"), readers.dicom_pixel_spacing(ds))
    groups = [(item, k) for k, item in enumerate(ds.get("PerFrameFunctionalGroupsSequence") or [])]
    groups += [(item, 0) for item in ds.get("SharedFunctionalGroupsSequence") or []]
    for group, frame in groups:
        for position in group.get("PlanePositionSequence") or []:
            orientation = readers.functional_group_item(ds, frame, "PlaneOrientationSequence")
            cosines = ds.get("ImageOrientationPatient") if orientation is None else orientation.get(
                "ImageOrientationPatient")
            move(position, cosines, readers.dicom_pixel_spacing(ds, frame))


def _divide_spacings(ds, scale):
    items = [ds]
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in ds.get(groups) or []:
            items.extend(group.get("PixelMeasuresSequence") or [])
    for item in items:
        for keyword in _SPACINGS:
            value = item.get(keyword)
            if value is not None and len(value) == 2:
                setattr(item, keyword, [_ds_number(float(v) / scale) for v in value])


def _derived(values, second):
    values = [values] if isinstance(values, str) else list(values or [])
    return ["DERIVED", second, *values[2:]]


def _mark_derived(ds):
    """ImageType DERIVED\\SECONDARY, the remaining values kept. Enhanced multi-frame IODs
    allow only PRIMARY as value 2, so there it is DERIVED\\PRIMARY, with the frames'
    FrameType (in the functional groups) DERIVED too."""
    enhanced = "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds
    ds.ImageType = _derived(ds.get("ImageType"), "PRIMARY" if enhanced else "SECONDARY")
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in ds.get(groups) or []:
            for element in group:
                for item in element.value if element.VR == "SQ" else []:
                    if "FrameType" in item:
                        item.FrameType = _derived(item.FrameType, "PRIMARY")


def _dicom_dataset(image, upscaled, predictor, indices, uncertainty=False):
    import pydicom
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    source, scale = image.source, predictor.scale
    if uncertainty:  # 16-bit unsigned, 0..65535 for 0 up to the window's width (_uncertainty_pixels)
        dtype, span = np.dtype(np.uint16), image.hi - image.lo

        def convert(values, frame):
            return _rounded(values / span * 65535.0, 0, 65535, dtype)
    else:
        convert, dtype = _dicom_converter(source)
    frames = _to_output(image, upscaled, indices, scale, convert, dtype)
    ds = copy.deepcopy(source)
    # Decode every element (raw ones keep the input's encoding, e.g. an implicit VR found
    # in an explicit-VR file) so that they are written in Explicit VR Little Endian.
    ds.walk(lambda dataset, element: None)
    for tag in [t for t in ds.keys() if t.element == 0 or 0x6000 <= t.group <= 0x601E and t.group % 2 == 0]:
        del ds[tag]  # group lengths (stale) and overlay planes (drawn on the old pixel grid)
    for keyword in ("PixelData", *_STALE_DICOM):
        if keyword in ds:
            delattr(ds, keyword)
    if int(source.get("SamplesPerPixel", 1)) == 3:
        for keyword in _COLOUR_DICOM:
            if keyword in ds:
                delattr(ds, keyword)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = frames.shape[1:]
    if "NumberOfFrames" in source:
        ds.NumberOfFrames = len(indices)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and indices != list(range(len(per_frame))):
        ds.PerFrameFunctionalGroupsSequence = pydicom.Sequence([per_frame[k] for k in indices])
    _move_positions(ds, scale)
    _divide_spacings(ds, scale)
    data = frames.tobytes()
    ds.add_new(0x7FE00010, "OB" if dtype.itemsize == 1 else "OW", data + b"\0" * (len(data) % 2))
    del frames, data

    _mark_derived(ds)
    ds.DerivationDescription = (f"Super-resolved x{scale} by {inference.describe(predictor)} (sr_tf upscale); "
                                f"pixel spacing divided by {scale}")[:1024]
    ds.SOPInstanceUID = generate_uid()
    original_series = str(source.get("SeriesInstanceUID", "") or source.get("SOPInstanceUID", ""))
    series = [original_series, str(predictor.name), f"x{scale}", *_series_options(predictor)]
    if uncertainty:
        _uncertainty_pixels(ds, image.hi - image.lo)
        # Its own series, beside the upscaled one: the same grid, values in the image's units.
        ds.DerivationDescription = (f"Uncertainty map of the x{scale} output of {inference.describe(predictor)} "
                                    "(sr_tf upscale): the spread of the 8-fold self-ensemble and the "
                                    "data-consistency residual, in the image's units")[:1024]
        ds.SeriesDescription = f"Uncertainty x{scale} {predictor.name}"[:64]
        for keyword in ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation", "VOILUTSequence"):
            if keyword in ds:
                delattr(ds, keyword)
        series.append("uncertainty")
        if "SeriesNumber" in ds:
            ds.SeriesNumber = (int(ds.SeriesNumber or 0) + 1) % 2**31
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=series)
    meta = ds.file_meta
    if "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if "ImplementationVersionName" in meta:
        del meta.ImplementationVersionName
    return ds


def _series_options(predictor):
    """What, beside the model and the scale, makes the pixels of an upscaled series: so
    that outputs with and without projection, ensemble or adaptation are never one series."""
    *wrappers, model = inference.chain(predictor)
    options = [f"adapted seed {model.adaptation.seed}"] if getattr(model, "adaptation", None) is not None else []
    options += ["ensemble" for wrapper in wrappers if getattr(wrapper, "ensemble_description", None)]
    if predictor.projection is not None:
        card = predictor.projection.card()
        options.append("projection " + " ".join(f"{k}={card[k]}" for k in sorted(card) if k != "description"))
    return options


def _uncertainty_pixels(ds, span):
    """The pixel description of an uncertainty map: 16-bit unsigned MONOCHROME2 (no
    polarity inversion, whatever the input's), a linear rescale that reads back the
    uncertainty in the image's units (``span`` the window's width over 65535 per stored
    step, intercept 0), no Modality LUT and no display window (the input's would hide it)."""
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    for keyword in ("ModalityLUTSequence", "WindowCenter", "WindowWidth", "WindowCenterWidthExplanation",
                    "VOILUTSequence"):
        if keyword in ds:
            delattr(ds, keyword)
    if "PresentationLUTShape" in ds:
        ds.PresentationLUTShape = "IDENTITY"
    slope = _ds_number(span / 65535.0)
    groups = [item for key in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")
              for item in ds.get(key) or []]
    for group in groups:
        if "FrameVOILUTSequence" in group:
            del group.FrameVOILUTSequence
        for item in group.get("PixelValueTransformationSequence") or []:
            item.RescaleSlope, item.RescaleIntercept = slope, _ds_number(0.0)
    if not any("PixelValueTransformationSequence" in group for group in groups):
        ds.RescaleSlope, ds.RescaleIntercept = slope, _ds_number(0.0)
        if str(ds.get("Modality", "")) != "CT":  # CT rescales to HU; other units are unspecified
            ds.RescaleType = "US"


def _write_dicom(image, upscaled, predictor, indices, fileobj, uncertainty=False):
    import pydicom

    pydicom.dcmwrite(fileobj, _dicom_dataset(image, upscaled, predictor, indices, uncertainty),
                     enforce_file_format=True)


# ----------------------------------------------------------------------------- NIfTI


def _nifti_image(image, upscaled, predictor, indices, uncertainty=False):
    source, scale = image.source, predictor.scale
    header = source.header.copy()
    shape = list(source.shape)
    a, b, c = axes = _nifti_axes(header, len(shape))
    first = 0
    if indices != list(range(image.slices.shape[0])):
        # A subset (the app's one slice) is a 3-D volume of consecutive slices of one volume.
        depth = 1 if c is None else shape[c]
        if indices != list(range(indices[0], indices[0] + len(indices))) or indices[0] // depth != indices[-1] // depth:
            raise UpscaleError(f"{image.path}: a NIfTI subset must be consecutive slices of one volume")
        shape = shape[:3]
        first = indices[0] % depth
        if c is not None:
            shape[c] = len(indices)
    shape[a] *= scale
    shape[b] *= scale

    dtype = header.get_data_dtype()
    # nibabel moves scl_slope/scl_inter from a loaded header into the array proxy.
    slope, inter = float(getattr(source.dataobj, "slope", 1.0)), float(getattr(source.dataobj, "inter", 0.0))
    native = dtype.newbyteorder("=")
    info = np.iinfo(native) if np.issubdtype(native, np.integer) else None
    low, high = (info.min, info.max) if info else (None, None)

    def convert(values, index):
        return _rounded((values - inter) / slope, low, high, native)

    data = _slices_to_nifti(_to_output(image, upscaled, indices, scale, convert, native), shape, axes)

    # New voxel i' is old voxel (i' + 0.5) / s - 0.5 along a and b: the outer corners stay put.
    to_old = np.eye(4)
    for axis in (a, b):
        to_old[axis, axis] = 1.0 / scale
        to_old[axis, 3] = 0.5 / scale - 0.5
    if c is not None:
        to_old[c, 3] += first
    forms = [(set_, *get(coded=True)) for get, set_ in ((header.get_sform, header.set_sform),
                                                         (header.get_qform, header.set_qform))]
    zooms = list(header.get_zooms())[:len(shape)]
    zooms[a] /= scale
    zooms[b] /= scale
    header.set_data_shape(shape)
    header.set_zooms(zooms)  # the qform is built from these: read both forms first
    for set_, affine, code in forms:
        if affine is not None:
            set_(affine @ to_old, code=int(code))
    projected = "" if predictor.projection is None else f" +projection {predictor.projection.iterations}"
    header["descrip"] = f"sr_tf {'uncertainty ' if uncertainty else ''}x{scale} {predictor.name}{projected}"[:79]
    if uncertainty:  # the input's display range would show the map almost black
        header["cal_min"], header["cal_max"] = 0.0, 0.0
    out = type(source)(data, None, header=header)
    if (slope, inter) != (1.0, 0.0):
        out.header.set_slope_inter(slope, inter)  # the constructor resets scaling
    return out


def _write_nifti(image, upscaled, predictor, indices, fileobj, uncertainty=False):
    raw = _nifti_image(image, upscaled, predictor, indices, uncertainty).to_bytes()
    if image.path.lower().endswith(".gz"):
        with gzip.GzipFile(fileobj=fileobj, mode="wb", compresslevel=1, mtime=0) as compressed:
            compressed.write(raw)
    else:
        fileobj.write(raw)


# ----------------------------------------------------------------------------- raster


def _write_png(image, upscaled, predictor, indices, fileobj, uncertainty=False):
    import cv2

    if len(indices) != 1:
        raise UpscaleError(f"{image.path}: a PNG holds one slice, got {len(indices)}")
    peak = 2 ** image.source["bits"] - 1
    dtype = np.uint8 if image.source["bits"] == 8 else np.uint16

    def convert(values, index):
        return _rounded((values - image.lo) / (image.hi - image.lo) * peak, 0, peak, dtype)

    pixels = _to_output(image, upscaled, indices, predictor.scale, convert, dtype)[0]
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise UpscaleError(f"{image.path}: PNG encoding failed")
    fileobj.write(encoded.data)


_WRITERS = {"dicom": _write_dicom, "nifti": _write_nifti, "raster": _write_png}


# ----------------------------------------------------------------------------- files


def split_extension(name):
    """``(stem, extension)`` with ``.nii.gz`` as one extension."""
    if name.lower().endswith(".nii.gz"):
        return name[:-7], name[-7:]
    return os.path.splitext(name)


def output_path(image_path, output_dir, scale):
    """``<output_dir>/<stem>_x<scale><ext>``: .nii/.nii.gz kept, rasters become .png and
    DICOM .dcm (a DICOM name without a known extension is kept whole as the stem)."""
    name = os.path.basename(os.fspath(image_path))
    stem, ext = split_extension(name)
    lower = ext.lower()
    if lower in readers.NIFTI_EXTENSIONS:
        new_ext = ext
    elif lower in readers.RASTER_EXTENSIONS:
        new_ext = ".png"
    else:
        new_ext = ".dcm"
        if lower not in readers.DICOM_EXTENSIONS:
            stem = name
    return os.path.join(os.fspath(output_dir), f"{stem}_x{scale}{new_ext}")


def uncertainty_path(output):
    """Where the uncertainty map of the output ``output`` goes: ``<stem>_uncertainty<ext>``
    beside it (a 16-bit PNG for a PNG)."""
    folder, name = os.path.split(os.fspath(output))
    stem, ext = split_extension(name)
    return os.path.join(folder, f"{stem}_uncertainty{ext}")


def _as_uncertainty(image):
    """``image`` as the uncertainty map is written: [0, 1] maps to 0 up to the window's
    width (an uncertainty in the image's own units: HU for CT), with no values outside
    the window carried over, and a raster as a 16-bit PNG."""
    source = {"bits": 16} if image.kind == "raster" else image.source
    return dataclasses.replace(image, lo=0.0, hi=image.hi - image.lo, physical=None, source=source)


def _encode(image, upscaled, predictor, slices, fileobj, uncertainty=False):
    indices = _indices(image, slices)
    upscaled = np.asarray(upscaled, np.float32)
    _check_shape(image, upscaled, indices, predictor.scale)
    if uncertainty:
        image = _as_uncertainty(image)
    try:
        _WRITERS[image.kind](image, upscaled, predictor, indices, fileobj, uncertainty)
    except readers.InputError as exc:
        raise UpscaleError(f"{image.path}: {exc}") from exc


def to_bytes(image, upscaled, predictor, slices=None, uncertainty=False):
    """The file :func:`write` would write, in memory, and a suggested file name."""
    buffer = io.BytesIO()
    _encode(image, upscaled, predictor, slices, buffer, uncertainty)
    name = output_path(image.path, "", predictor.scale)
    return buffer.getvalue(), os.path.basename(uncertainty_path(name) if uncertainty else name)


def _refuse_input(image_path, target):
    if os.path.abspath(target) == os.path.abspath(image_path) or (
            os.path.exists(target) and os.path.samefile(target, image_path)):
        raise UpscaleError(f"{image_path}: refusing to overwrite the input with its output")


def write(image, upscaled, predictor, output_path, slices=None, uncertainty=False):
    """Write the upscaled slices in the input's own format to ``output_path`` (under a
    temporary name, then renamed; never over the input). Returns the path.
    ``uncertainty=True``: ``upscaled`` is the uncertainty map, written as a derived image
    of its own (``_as_uncertainty``; for DICOM in its own series)."""
    target = os.fspath(output_path)
    _refuse_input(image.path, target)
    with files.atomic_open(target, "wb") as f:
        _encode(image, upscaled, predictor, slices, f, uncertainty)
    return target


def adapted(predictor, image, adapt):
    """``predictor`` with its model replaced by a copy adapted to ``image``
    (``sr_tf.adaptation``; ``adapt`` a dict of :func:`sr_tf.adaptation.adapt`'s keywords:
    steps, seconds, seed), the report on the copy's ``adaptation``. UpscaleError when the
    model is not a Keras model or cannot be adapted."""
    from sr_tf import adaptation

    try:
        return inference.adapted(predictor, image.slices, **adapt)
    except adaptation.AdaptationError as exc:
        raise UpscaleError(f"{image.path}: {exc}") from exc


def upscale_file(predictor, path, output_dir, tile=inference.DEFAULT_TILE, overlap=inference.DEFAULT_OVERLAP,
                 batch_size=inference.DEFAULT_BATCH, output=None, progress=None, adapt=None, uncertainty=False,
                 threshold=None):
    """Load, upscale and write one file (to ``output``, default :func:`output_path`).
    Never raises for a bad input: returns a report dict with ``status`` "ok" or "failed",
    ``output`` and ``error`` (the reason, naming the file).

    ``adapt``: fine-tune a copy of the model on this file first (:func:`adapted`; the
    report gains ``adaptation``). ``uncertainty``: also write the uncertainty map beside
    the output (:func:`uncertainty_path`; ``predictor`` must run the self-ensemble with
    its spread); the report gains ``uncertainty`` with the fraction of pixels above
    ``threshold`` (``sr_tf.ensemble.DEFAULT_THRESHOLD`` by default).
    """
    from sr_tf import ensemble

    started = time.perf_counter()
    report = {"input": os.fspath(path), "status": "failed", "output": None, "error": None}
    try:
        target = output or output_path(path, output_dir, predictor.scale)
        _refuse_input(path, target)
        image = load(path)
        report.update(kind=image.kind, modality=image.modality, input_shape=list(image.slices.shape))
        if adapt is not None:
            predictor = adapted(predictor, image, adapt)
            report["adaptation"] = dataclasses.asdict(inference.innermost(predictor).adaptation)
        result = upscale(predictor, image, tile, overlap, batch_size, progress=progress, uncertainty=uncertainty)
        upscaled, maps = result if uncertainty else (result, None)
        report["output_shape"] = list(upscaled.shape)
        if uncertainty:
            _refuse_input(path, uncertainty_path(target))
        written = write(image, upscaled, predictor, target)
        if uncertainty:  # after the output: a failed output leaves no map behind
            threshold = ensemble.DEFAULT_THRESHOLD if threshold is None else float(threshold)
            report["uncertainty"] = {"output": write(image, maps, predictor, uncertainty_path(target), uncertainty=True),
                                     "threshold": threshold, "fraction_above": ensemble.fraction_above(maps, threshold)}
        report["output"] = written
        report["status"] = "ok"
    except UpscaleError as exc:
        report["error"] = str(exc)
    except Exception as exc:  # a model or I/O failure on one file must not stop the others
        report["error"] = f"{path}: {type(exc).__name__}: {exc}"
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report
