"""Writers: upscaled slices -> DICOM, NIfTI or PNG bytes in the input's own format.

DICOM: the original stored representation (bits, signedness, rescale or Modality LUT,
MONOCHROME1 polarity), uncompressed Explicit VR Little Endian, a new SOP Instance UID and
a new Series Instance UID derived from the original one and the :class:`Derivation` (so
the files of one series upscaled the same way form one new series), ImageType
DERIVED\\SECONDARY, a DerivationDescription saying how the pixels were made, pixel
spacing divided by the scale and ImagePositionPatient moved so that the image's outer
corner stays where it was. NIfTI: the original array layout and orientation (never
reoriented; ``readers.nifti_axes``): the two in-plane voxel axes are upscaled, the others
kept, the sform/qform rescaled so the grid covers the same field of view in world
coordinates, the dtype and scl_slope/scl_inter kept. Raster: PNG of the input's bit depth
(8 or 16), grayscale.

Values. The model's output in [0, 1] goes back through each slice's window to physical
values (``sr_tf.intensity.to_physical``); the input's values outside the window (padding
at -3024 HU, metal above 3071 HU, the brightest 0.1 % of an MR), which
:class:`~sr_tf.io.readers.Image` keeps, are carried into the output by nearest
neighbour, so nothing is clipped but to what the output's stored type can hold.

An uncertainty map (``uncertainty=True``) is written as a derived image of its own: [0, 1]
maps to 0 up to the window's width (an uncertainty in the image's units: HU for CT); for
DICOM in its own series, 16-bit MONOCHROME2 with a linear rescale.
"""

import copy
import dataclasses
import gzip

import numpy as np

from sr_tf import intensity
from sr_tf.io import readers
from sr_tf.io.readers import InputError

# Elements computed from the old pixel data, or describing its encoding, that no longer hold.
_STALE_DICOM = (
    "SmallestImagePixelValue", "LargestImagePixelValue", "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
)
# Colour input becomes one luminance sample; these describe colour pixel data.
_COLOUR_DICOM = ("PlanarConfiguration", "ICCProfile", "ColorSpace")
_SPACINGS = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")
_ROW_BLOCK = 64  # LR rows converted to the output type at a time (bounds float64 temporaries)




@dataclasses.dataclass(frozen=True)
class Derivation:
    """How the upscaled pixels were made, as the written file records it."""

    scale: int
    name: str  # the model's name: in the new series' UID, the NIfTI descrip, the SeriesDescription
    description: str  # the DICOM DerivationDescription's "by ...": model, projection, ensemble, adaptation
    # What else makes the pixels (projection, ensemble, adaptation): in the new series' UID, so that
    # outputs made differently are never one series.
    options: tuple = ()
    note: str = ""  # a short suffix of the NIfTI descrip (e.g. " +projection 20")


def _physical(image, rows, index, first_row, scale):
    """Physical values (as loaded) of upscaled ``rows`` of slice ``index``, starting at LR row
    ``first_row``: the model output through [lo, hi], and the input's values outside [lo, hi]
    carried over by nearest neighbour (see the module docstring)."""
    lo, hi = image.window(index)
    values = intensity.to_physical(rows, lo, hi)
    if image.physical is not None:
        source = image.physical[index, first_row:first_row + rows.shape[0] // scale]
        outside = (source < lo) | (source > hi)
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


def _width(window):
    lo, hi = window
    return hi - lo


def _rounded(values, lo, hi, dtype):
    """Round to integers, clip to [lo, hi] and cast (floats are only cast)."""
    if np.issubdtype(dtype, np.integer):
        values = np.clip(np.rint(values), lo, hi)
    return values.astype(dtype)


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
            raise InputError("a non-monotonic Modality LUT cannot be inverted to write values back")
        flip = table[0] + table[-1]

        def to_stored(values, frame):
            return np.interp(values, table, stored)
    else:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        ends = np.array([low, high], np.float64)
        mapped = np.array(readers.modality_lut([ends] * frames, ds))  # (frames, 2): the LUT at both ends
        slopes = (mapped[:, 1] - mapped[:, 0]) / (high - low)
        if np.any(slopes == 0):
            raise InputError("RescaleSlope 0: stored values cannot be recovered")
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


def _dicom_dataset(image, upscaled, derivation, indices, uncertainty=False):
    import pydicom
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    source, scale = image.source, derivation.scale
    span = _width(image.window(indices[0]))  # one window a DICOM file
    if uncertainty:  # 16-bit unsigned, 0..65535 for 0 up to the window's width (_uncertainty_pixels)
        dtype = np.dtype(np.uint16)

        def convert(values, frame):
            return _rounded(intensity.to_levels(values, 0.0, span), 0, intensity.STORED_MAX, dtype)
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
    ds.DerivationDescription = (f"Super-resolved x{scale} by {derivation.description} (sr_tf upscale); "
                                f"pixel spacing divided by {scale}")[:1024]
    ds.SOPInstanceUID = generate_uid()
    original_series = str(source.get("SeriesInstanceUID", "") or source.get("SOPInstanceUID", ""))
    series = [original_series, str(derivation.name), f"x{scale}", *derivation.options]
    if uncertainty:
        _uncertainty_pixels(ds, span)
        # Its own series, beside the upscaled one: the same grid, values in the image's units.
        ds.DerivationDescription = (f"Uncertainty map of the x{scale} output of {derivation.description} "
                                    "(sr_tf upscale): the spread of the 8-fold self-ensemble and the "
                                    "data-consistency residual, in the image's units")[:1024]
        ds.SeriesDescription = f"Uncertainty x{scale} {derivation.name}"[:64]
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
    slope = _ds_number(intensity.quantisation_step(0.0, span))
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


def _write_dicom(image, upscaled, derivation, indices, fileobj, uncertainty=False):
    import pydicom

    pydicom.dcmwrite(fileobj, _dicom_dataset(image, upscaled, derivation, indices, uncertainty),
                     enforce_file_format=True)


# ----------------------------------------------------------------------------- NIfTI


def _nifti_image(image, upscaled, derivation, indices, uncertainty=False):
    source, scale = image.source, derivation.scale
    header = source.header.copy()
    shape = list(source.shape)
    a, b, c = axes = readers.nifti_axes(header, len(shape))
    first = 0
    if indices != list(range(image.slices.shape[0])):
        # A subset (the app's one slice) is a 3-D volume of consecutive slices of one volume.
        depth = 1 if c is None else shape[c]
        if indices != list(range(indices[0], indices[0] + len(indices))) or indices[0] // depth != indices[-1] // depth:
            raise InputError("a NIfTI subset must be consecutive slices of one volume")
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

    data = readers.from_native_slices(_to_output(image, upscaled, indices, scale, convert, native), shape, axes)

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
    header["descrip"] = f"sr_tf {'uncertainty ' if uncertainty else ''}x{scale} {derivation.name}{derivation.note}"[:79]
    if uncertainty:  # the input's display range would show the map almost black
        header["cal_min"], header["cal_max"] = 0.0, 0.0
    out = type(source)(data, None, header=header)
    if (slope, inter) != (1.0, 0.0):
        out.header.set_slope_inter(slope, inter)  # the constructor resets scaling
    return out


def _write_nifti(image, upscaled, derivation, indices, fileobj, uncertainty=False):
    raw = _nifti_image(image, upscaled, derivation, indices, uncertainty).to_bytes()
    if image.path.lower().endswith(".gz"):
        with gzip.GzipFile(fileobj=fileobj, mode="wb", compresslevel=1, mtime=0) as compressed:
            compressed.write(raw)
    else:
        fileobj.write(raw)


# ----------------------------------------------------------------------------- raster


def _write_png(image, upscaled, derivation, indices, fileobj, uncertainty=False):
    import cv2

    if len(indices) != 1:
        raise InputError(f"a PNG holds one slice, got {len(indices)}")
    peak = 2 ** image.source["bits"] - 1
    dtype = np.uint8 if image.source["bits"] == 8 else np.uint16
    lo, hi = image.window(indices[0])

    def convert(values, index):
        return _rounded(intensity.to_levels(values, lo, hi, peak), 0, peak, dtype)

    pixels = _to_output(image, upscaled, indices, derivation.scale, convert, dtype)[0]
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise InputError("PNG encoding failed")
    fileobj.write(encoded.data)


_WRITERS = {"dicom": _write_dicom, "nifti": _write_nifti, "raster": _write_png}


def as_uncertainty(image):
    """``image`` as the uncertainty map is written: [0, 1] maps to 0 up to the window's
    width (an uncertainty in the image's own units: HU for CT), with no values outside
    the window carried over, and a raster as a 16-bit PNG."""
    source = {"bits": 16} if image.kind == "raster" else image.source
    windows = np.stack([np.zeros(len(image.windows)), image.windows[:, 1] - image.windows[:, 0]], axis=1)
    return dataclasses.replace(image, windows=windows, physical=None, source=source)




def encode(image, upscaled, derivation, indices, fileobj, uncertainty=False):
    """Write the upscaled slices ``indices`` of ``image`` (an :class:`~sr_tf.io.readers.Image`)
    to ``fileobj`` in the image's own format; ``uncertainty=True``: ``upscaled`` is its
    uncertainty map (:func:`as_uncertainty`). InputError with the reason when it cannot be."""
    upscaled = np.asarray(upscaled, np.float32)
    expected = (len(indices), image.slices.shape[1] * derivation.scale, image.slices.shape[2] * derivation.scale)
    if upscaled.shape != expected:
        raise InputError(f"upscaled shape {upscaled.shape} does not match {expected} "
                         f"({len(indices)} slice(s) x{derivation.scale})")
    if uncertainty:
        image = as_uncertainty(image)
    _WRITERS[image.kind](image, upscaled, derivation, indices, fileobj, uncertainty)
