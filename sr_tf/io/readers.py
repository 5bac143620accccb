"""Source readers: DICOM, NIfTI and raster X-rays -> slices in physical units.

Each reader returns a :class:`Volume`: a list of 2-D float arrays in physical units
(HU for CT, detector value with dense bright for X-ray, signal for MR) plus what the
record needs (modality, patient id, spacing, the default intensity window). Readers
raise :class:`InputError` with a reason a user can act on; the caller names the file.
"""

import dataclasses
import io
import math
import os
import re
import stat

import numpy as np

from sr_tf import intensity

DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
RASTER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}

# Transfer syntaxes whose decoders are GPL and therefore not installed by default.
_GPL_ONLY_SYNTAXES = {
    "1.2.840.10008.1.2.4.51": "JPEG Extended (12-bit)",
}
# GDCM, pydicom's first choice for these, ends the whole process (an uncaught C++
# exception) on some corrupt JPEG and JPEG 2000 streams; these plugins raise instead
# and decode the sample files identically, so they are used when installed.
_RAISING_PLUGINS = {
    "1.2.840.10008.1.2.4.50": "pillow",  # JPEG Baseline
    "1.2.840.10008.1.2.4.90": "pylibjpeg",  # JPEG 2000 Lossless (pylibjpeg-openjpeg)
    "1.2.840.10008.1.2.4.91": "pylibjpeg",  # JPEG 2000
}


class InputError(ValueError):
    """An input that cannot be converted; the message is the reason."""


@dataclasses.dataclass
class Volume:
    """Slices of one source unit (a file, a multi-frame file or a DICOM series)."""

    slices: list  # 2-D float arrays in physical units
    modality: str
    patient_id: str
    source: str
    pixel_spacing: tuple  # (row, col) mm, 0 when unknown
    intensity_range: tuple  # default (min, max): docs/DESIGN.md, contract 1
    slice_indices: list = None
    slice_sources: list = None  # per-slice source when a series spans files
    file_format: str = None  # "dicom", "nifti" or "raster"
    # What a writer needs to write the same format back: the pydicom Dataset (pixels
    # included) of a DICOM file, the nibabel image of a NIfTI read in its own layout,
    # ``{"bits": 8 | 16}`` for a raster; None for a series and for canonical NIfTI.
    native: object = None

    def __post_init__(self):
        if self.slice_indices is None:
            self.slice_indices = list(range(len(self.slices)))
        if self.slice_sources is None:
            self.slice_sources = [self.source] * len(self.slices)


def not_a_regular_file(path):
    """``(broken, reason)`` when ``path`` is not a regular file that can be read (broken
    is True for a symbolic link that leads nowhere or in a loop), else None. Checked
    before anything opens the file: opening a FIFO would wait for a writer forever."""
    try:
        mode = os.stat(path).st_mode  # follows symbolic links
    except OSError as exc:
        if os.path.islink(path):
            return True, f"broken symbolic link ({exc.strerror or exc}): its target cannot be read"
        return True, f"cannot read the file ({exc.strerror or exc})"
    if not stat.S_ISREG(mode):
        what = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        return False, f"{what}: only regular files are read"
    return None


def detect_format(path):
    """``dicom``, ``nifti``, ``raster`` or None, from the name and the DICOM preamble."""
    lower = path.lower()
    if lower.endswith(NIFTI_EXTENSIONS):
        return "nifti"
    if lower.endswith(RASTER_EXTENSIONS):
        return "raster"
    if lower.endswith(DICOM_EXTENSIONS):
        return "dicom"
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return None
    return "dicom" if head[128:132] == b"DICM" else None


def _check_shape(array, source):
    if array.size == 0 or min(array.shape[-2:]) == 0:
        raise InputError(f"zero-size image {tuple(array.shape)}")


# ----------------------------------------------------------------------------- DICOM


class _BoundedFile(io.BufferedReader):
    """A file whose ``read(n)`` asks for no more than the bytes left in it: Python
    allocates the n bytes a read asks for before reading, and in a corrupt DICOM file an
    element's length can claim 4 GB."""

    def __init__(self, path):
        super().__init__(io.FileIO(path, "rb"))
        self.size = os.fstat(self.fileno()).st_size

    def read(self, size=-1):
        if size is not None and size > 0:
            size = min(size, max(self.size - self.tell(), 0))
        return super().read(size)


def dicom_dataset(path, stop_before_pixels=False):
    """The pydicom Dataset of a DICOM file; InputError when it cannot be read.

    The file is read through ``_BoundedFile``, and every public element is parsed here
    (pydicom parses a value when it is first used), so that a corrupt one is reported
    now, naming its tag; then the values the readers take from it are checked
    (``check_header_values``)."""
    import pydicom

    try:
        with _BoundedFile(path) as f:
            ds = pydicom.dcmread(f, stop_before_pixels=stop_before_pixels)
        _parse_public_elements(ds)
    except Exception as exc:  # pydicom raises many types for corrupt files
        raise InputError(f"not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    check_header_values(ds)
    return ds


def _parse_public_elements(ds):
    for tag in list(ds.keys()):
        if not tag.is_private and ds[tag].VR == "SQ":
            for item in ds[tag].value:
                _parse_public_elements(item)


# What the readers and the series discovery take from a header: (kind, count) for
# integers and numbers, text, or a sequence. In a corrupt file (a changed VR or length)
# any element can hold several numbers, text, bytes or a sequence.
_HEADER_VALUES = {
    **dict.fromkeys(("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
                     "NumberOfFrames", "InstanceNumber"), (int, 1)),
    "RescaleSlope": (float, 1), "RescaleIntercept": (float, 1), "PixelSpacing": (float, 2),
    "ImagerPixelSpacing": (float, 2), "ImagePositionPatient": (float, 3), "ImageOrientationPatient": (float, 6),
    **dict.fromkeys(("Modality", "PhotometricInterpretation", "PatientID", "SeriesInstanceUID", "SOPClassUID",
                     "SegmentationType"), (str, None)),
    **dict.fromkeys(("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence", "ModalityLUTSequence"),
                    ("sequence", None)),
}


def _shown(value):
    """A short description of a header value that never prints a sequence (printing one
    parses its items, corrupt ones included)."""
    from pydicom.multival import MultiValue

    text = "\\".join(map(str, value)) if isinstance(value, MultiValue) else value
    return repr(text)[:60] if isinstance(text, (str, bytes, int, float)) else f"a {type(value).__name__}"


def check_header_values(ds):
    """InputError unless each element of ``_HEADER_VALUES`` that the dataset has (and
    that is not empty) holds what the readers take from it."""
    from pydicom.multival import MultiValue
    from pydicom.sequence import Sequence

    for keyword, (kind, count) in _HEADER_VALUES.items():
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        values = list(value) if isinstance(value, MultiValue) else [value]
        if kind == "sequence":
            valid, expected = isinstance(value, Sequence), "a sequence"
        elif kind is str:
            valid, expected = all(isinstance(v, str) for v in values), "text"
        else:
            try:
                valid = len(values) == count and all(math.isfinite(kind(v)) for v in values)
            except (TypeError, ValueError, OverflowError):
                valid = False
            expected = f"{count} numbers" if count > 1 else "an integer" if kind is int else "a number"
        if not valid:
            raise InputError(f"corrupt header: {keyword} is {_shown(value)}, not {expected}")


def read_dicom_header(path):
    """Header only (no pixel data), for grouping files into series."""
    return dicom_dataset(path, stop_before_pixels=True)


def functional_group_item(ds, frame, sequence):
    """The item of ``sequence`` for ``frame`` in an enhanced multi-frame object, if any."""
    from pydicom.sequence import Sequence

    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and len(seq) > index and sequence in seq[index]:
            items = seq[index][sequence].value
            if not isinstance(items, Sequence):
                raise InputError(f"corrupt header: {sequence} is {_shown(items)}, not a sequence")
            if items:
                return items[0]
    return None


def dicom_pixel_spacing(ds, frame=0):
    """(row, col) spacing in mm from PixelSpacing, ImagerPixelSpacing or functional groups."""
    for source in (ds, functional_group_item(ds, frame, "PixelMeasuresSequence")):
        if source is None:
            continue
        for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
            value = source.get(keyword)
            if value is not None and len(value) == 2:
                try:
                    return float(value[0]), float(value[1])
                except (TypeError, ValueError) as exc:
                    raise InputError(f"corrupt header: {keyword} is {_shown(value)}, not 2 numbers") from exc
    return 0.0, 0.0


def modality_lut(frames, ds):
    """Apply the modality LUT (rescale) frame by frame, honouring enhanced functional groups."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_modality_lut

    if "RescaleSlope" in ds or "ModalityLUTSequence" in ds or "PerFrameFunctionalGroupsSequence" not in ds:
        return [np.asarray(apply_modality_lut(f, ds), dtype=np.float64) for f in frames]
    out = []
    for index, frame in enumerate(frames):
        item = functional_group_item(ds, index, "PixelValueTransformationSequence")
        lut = Dataset()
        if item is not None and "RescaleSlope" in item:
            lut.RescaleSlope = item.RescaleSlope
            lut.RescaleIntercept = item.RescaleIntercept
        out.append(np.asarray(apply_modality_lut(frame, lut), dtype=np.float64))
    return out


def stored_value_range(ds):
    """(min, max) stored pixel value that BitsStored and PixelRepresentation allow."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def decode_dicom_frames(ds, path):
    """Decoded frames of a dataset as a list of 2-D arrays (RGB converted to luminance)."""
    import cv2
    from pydicom.pixels import get_decoder

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if "SOPClassUID" not in ds and "Modality" not in ds:
            raise InputError("not a valid DICOM image: no SOP Class UID, Modality or pixel data (corrupt file?)")
        kind = ds.get("Modality")
        raise InputError(f"no pixel data (Modality {kind}; e.g. an RT plan or structured report is not an image)")
    if "Rows" in ds and "Columns" in ds and (not ds.Rows or not ds.Columns):
        raise InputError(f"zero-size image (Rows {ds.Rows}, Columns {ds.Columns})")
    file_meta = getattr(ds, "file_meta", None)
    syntax = str(file_meta.get("TransferSyntaxUID", "")) if file_meta is not None else ""
    try:
        plugin = _RAISING_PLUGINS.get(syntax)
        if plugin is not None and plugin in get_decoder(syntax).available_plugins:
            ds.pixel_array_options(decoding_plugin=plugin)
        pixels = ds.pixel_array
    except BaseException as exc:  # pylibjpeg-rle's panic on a corrupt stream is pyo3's PanicException, no Exception
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            raise
        reason = f"pixel data could not be decoded ({type(exc).__name__}: {exc})"
        if syntax in _GPL_ONLY_SYNTAXES:
            reason = (
                f"{_GPL_ONLY_SYNTAXES[syntax]} pixel data needs the optional GPL-3.0 decoder: "
                "pip install pylibjpeg-libjpeg"
            )
        raise InputError(reason) from exc
    samples = int(ds.get("SamplesPerPixel", 1))
    frames_count = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = np.asarray(pixels)
    if frames_count == 1:
        pixels = pixels[np.newaxis]
    _check_shape(pixels[..., 0] if samples > 1 else pixels, path)
    if samples == 3:
        # pydicom returns RGB (YBR is converted by default); luminance by ITU-R BT.601.
        pixels = np.stack([cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in pixels])
    elif samples != 1:
        raise InputError(f"unsupported SamplesPerPixel {samples}")
    return list(pixels)


def window_from_pixels(ds, modality):
    """Whether the default window of ``ds`` depends on its pixels (MR and others: a
    percentile) rather than on its header alone (CT, X-ray, colour)."""
    return not (modality == "CT" or modality in intensity.XRAY_MODALITIES or int(ds.get("SamplesPerPixel", 1)) == 3)


def dicom_default_range(ds, modality, slices):
    """The default window (docs/DESIGN.md, contract 1) of a dataset whose frames (or whose
    series' slices) are ``slices``: used only when :func:`window_from_pixels`."""
    if modality == "CT":
        return intensity.CT_RANGE
    if not window_from_pixels(ds, modality):
        return intensity.xray_range(int(ds.get("BitsStored", 8)))
    return percentile_window(np.concatenate([s.ravel() for s in slices]))


def percentile_window(values):
    """``intensity.percentile_range`` of an image, InputError when it has none (no
    positive or no finite value)."""
    try:
        return intensity.percentile_range(values)
    except ValueError as exc:
        raise InputError(str(exc)) from exc


# The most pixels one image (a slice, a frame) may have; checked from the header, before
# anything is decoded, so a small file that claims a huge image (a decompression bomb)
# costs nothing. 100 MP is a 10000 x 10000 image, 400 MB as float32; the largest
# radiographs are a quarter of that. 0 disables the check. upscale.py and data_prep set it
# with --max_pixels (data_prep passes it to its workers).
DEFAULT_MAX_PIXELS = 100_000_000
max_pixels_limit = DEFAULT_MAX_PIXELS


def check_pixel_count(height, width, max_pixels=None, what="image"):
    """InputError when ``height`` x ``width`` is over ``max_pixels`` (default:
    ``max_pixels_limit``; 0: no limit)."""
    limit = max_pixels_limit if max_pixels is None else max_pixels
    height, width = int(height), int(width)
    if limit and height * width > limit:
        raise InputError(f"{what} of {width} x {height} pixels ({height * width / 1e6:.0f} MP) is over the limit "
                         f"of {limit / 1e6:g} MP (--max_pixels); refused before decoding")


# A file (all frames of a DICOM, all volumes of a NIfTI) may hold this many times the
# per-image limit: 1000 M pixels or voxels at the default, 4 GB as float32. Decoders
# allocate the whole array a header claims before they read a byte of it.
FILE_PIXELS_FACTOR = 10


def check_file_pixel_count(count, what, max_pixels=None):
    """InputError when a file's ``count`` pixels (or voxels), described by ``what``, are
    over ``FILE_PIXELS_FACTOR`` x ``max_pixels`` (default: ``max_pixels_limit``; 0: no limit)."""
    limit = FILE_PIXELS_FACTOR * (max_pixels_limit if max_pixels is None else max_pixels)
    if limit and count > limit:
        raise InputError(f"{what} ({count / 1e6:.0f} M in all) is over the limit of {limit / 1e6:g} M for one file "
                         f"({FILE_PIXELS_FACTOR} x --max_pixels); refused before decoding")


# Objects whose pixels are labels or indices, not intensities.
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def check_intensity_image(ds):
    """InputError unless the dataset's pixels are intensities: a segmentation (SEG, 1-bit
    BINARY or FRACTIONAL), 1-bit pixel data or PALETTE COLOR indices are refused, with
    the reason, before anything is decoded."""
    modality = str(ds.get("Modality", "") or "").upper()
    if modality == "SEG" or str(ds.get("SOPClassUID", "")) == SEGMENTATION_STORAGE:
        kind = str(ds.get("SegmentationType", "") or "").strip()
        raise InputError(f"a segmentation ({kind or 'SEG'}): its pixels are labels, not image intensities")
    if int(ds.get("BitsAllocated", 16) or 16) == 1:
        raise InputError("1-bit pixel data (a mask or an overlay-like object), not image intensities")
    if str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        raise InputError("PALETTE COLOR pixels are indices into a colour table, not intensities")


def dicom_to_physical(ds, path, max_pixels=None):
    """Frames of one DICOM dataset in physical units: modality LUT, MONOCHROME1 inverted.
    InputError for objects whose pixels are not intensities (``check_intensity_image``)
    and for frames over ``max_pixels`` (``check_pixel_count``), before decoding."""
    if "PixelData" in ds:
        check_intensity_image(ds)
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    check_pixel_count(rows, columns, max_pixels, "a frame")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    check_file_pixel_count(count * rows * columns, f"{count} frames of {columns} x {rows} pixels", max_pixels)
    frames = decode_dicom_frames(ds, path)
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        return [f.astype(np.float64) for f in frames]
    physical = modality_lut(frames, ds)
    if ds.get("PhotometricInterpretation", "") == "MONOCHROME1":
        # Invert within the full stored range mapped through the LUT, so dense is bright.
        lo, hi = (float(v) for v in modality_lut([np.array(stored_value_range(ds))], ds)[0])
        physical = [lo + hi - f for f in physical]
    return physical


def _patient_id(ds, fallback):
    value = str(ds.get("PatientID", "") or "").strip()
    return value or fallback


def read_dicom(path, max_pixels=None, window=None):
    """One DICOM file; a multi-frame file gives one slice per frame. ``window``: the
    intensity window when the file is one of a series (:func:`series_window`), else the
    file's own default (:func:`dicom_default_range`)."""
    ds = dicom_dataset(path)
    slices = dicom_to_physical(ds, path, max_pixels)
    modality = str(ds.get("Modality", "OT") or "OT").upper()
    return Volume(
        slices=slices,
        modality=modality,
        patient_id=_patient_id(ds, str(ds.get("SeriesInstanceUID", "") or path)),
        source=path,
        pixel_spacing=dicom_pixel_spacing(ds),
        intensity_range=dicom_default_range(ds, modality, slices) if window is None else tuple(window),
        file_format="dicom",
        native=ds,
    )


def series_sort_key(header, path):
    """Order slices of a series along the slice normal (ImagePositionPatient), never by number."""
    position = header.get("ImagePositionPatient")
    orientation = header.get("ImageOrientationPatient")
    if position and orientation and len(orientation) == 6:  # present and not empty
        row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
        return (0, float(np.dot(np.cross(row, col), np.asarray(position, float))), path)
    number = header.get("InstanceNumber")
    return (1, float(number or 0), path)


def read_dicom_series(paths, max_pixels=None):
    """Single-frame files of one series, already sorted; returns (volume, failures).

    A file that fails to decode is reported and the rest of the series kept.
    """
    slices, indices, sources, failures = [], [], [], []
    first = None
    for index, path in enumerate(paths):
        try:
            ds = dicom_dataset(path)
            frames = dicom_to_physical(ds, path, max_pixels)
        except InputError as exc:
            failures.append((path, str(exc)))
            continue
        except Exception as exc:
            failures.append((path, f"not a readable DICOM file ({type(exc).__name__}: {exc})"))
            continue
        first = first if first is not None else ds
        slices.extend(frames)
        indices.extend([index] * len(frames))
        sources.extend([path] * len(frames))
    if first is None:
        return None, failures
    modality = str(first.get("Modality", "OT") or "OT").upper()
    volume = Volume(
        slices=slices,
        modality=modality,
        patient_id=_patient_id(first, str(first.get("SeriesInstanceUID", "") or os.path.dirname(paths[0]))),
        source=os.path.dirname(paths[0]) or paths[0],
        pixel_spacing=dicom_pixel_spacing(first),
        intensity_range=dicom_default_range(first, modality, slices),
        slice_indices=indices,
        slice_sources=sources,
        file_format="dicom",
    )
    return volume, failures


def series_window(paths, max_pixels=None):
    """The intensity window of a series of single-frame files, as :func:`read_dicom_series`
    gives it (one window for the whole series): so that upscaling, which reads and writes
    the files one by one, maps each file as conversion mapped the series. None when no
    file of the series can be read."""
    try:
        header = read_dicom_header(paths[0])
    except InputError:
        header = None
    if header is not None:
        modality = str(header.get("Modality", "OT") or "OT").upper()
        if not window_from_pixels(header, modality):
            return tuple(dicom_default_range(header, modality, None))
    volume, _ = read_dicom_series(paths, max_pixels)
    return None if volume is None else tuple(volume.intensity_range)


# ----------------------------------------------------------------------------- NIfTI


def nifti_slices(data, zooms, slice_axis):
    """Slices of a RAS-oriented 3-D array along ``slice_axis``, in display orientation.

    Each slice is rotated 90 degrees so that rows run top (anterior / superior) to
    bottom and columns run left to right in the array's first remaining axis.
    Returns ``(slices, (row_spacing, col_spacing))``.
    """
    axis = SLICE_AXES[slice_axis]
    in_plane = [a for a in range(3) if a != axis]  # (cols axis, rows axis) after rot90
    moved = np.moveaxis(data, axis, 0)
    slices = [np.rot90(moved[k]) for k in range(moved.shape[0])]
    return slices, (float(zooms[in_plane[1]]), float(zooms[in_plane[0]]))


def nifti_axes(header, ndim):
    """``(a, b, c)`` of a file's own array layout: the in-plane voxel axes a < b and the
    slice axis c (the header's slice dimension when set, else 2; None for a 2-D image).
    Upscaling keeps this layout (it never reorients), so its output lies on the input's
    own voxel grid."""
    if ndim == 2:
        return 0, 1, None
    slice_dim = header.get_dim_info()[2]
    c = slice_dim if slice_dim in (0, 1, 2) else 2
    a, b = (axis for axis in range(3) if axis != c)
    return a, b, c


def nifti_order(ndim, axes):
    """Axis order that puts volumes (dims 4+) first, then slices, then the in-plane axes."""
    a, b, c = axes
    return [*range(3, ndim), *([] if c is None else [c]), a, b]


def native_slices(data, axes):
    """(S, H, W) slices of an array in its own layout, slice s = volume * depth + index
    along c, each rotated like :func:`nifti_slices` (rows along axis b, reversed;
    columns along a)."""
    moved = np.transpose(data, nifti_order(data.ndim, axes))
    stack = moved.reshape(-1, data.shape[axes[0]], data.shape[axes[1]])
    return np.rot90(stack, 1, axes=(1, 2))


def from_native_slices(stack, shape, axes):
    """Inverse of :func:`native_slices` for an array of the given own-layout ``shape``."""
    order = nifti_order(len(shape), axes)
    moved = np.rot90(stack, -1, axes=(1, 2)).reshape([shape[i] for i in order])
    return np.transpose(moved, np.argsort(order))


def nifti_modality_and_window(volume, modality=None):
    """``(modality, window)`` of one 3-D volume: ``modality`` when given, else CT when
    :func:`looks_like_ct`, else MR; the window of that modality (CT: the fixed HU window;
    others: the volume's percentile range). One volume at a time, whether it is read for
    training or for upscaling, so a 4-D file's volumes each keep their own mapping."""
    if modality is None:
        modality = "CT" if looks_like_ct(volume) else "MR"
    return modality, (intensity.CT_RANGE if modality == "CT" else percentile_window(volume))


def _load_nifti(path, layout, slice_axis, max_pixels):
    """The nibabel image of ``path``, reoriented to closest canonical for ``layout``
    "canonical"; its slice size and its whole size are checked from the header first
    (``check_pixel_count``, ``check_nifti_size``), before anything reads the voxels:
    reorienting reads them."""
    import nibabel as nib

    try:
        image = nib.load(path)
        if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
            raise InputError(f"{type(image).__name__} is not a NIfTI volume")
        shape = tuple(image.shape[:3]) + (1,) * (3 - len(image.shape[:3]))
        if layout == "canonical":  # canonical axis i is the file's axis ornt[i, 0]
            ornt = nib.io_orientation(image.affine)
            shape = tuple(shape[int(ornt[i, 0])] for i in range(3))
            in_plane = [shape[a] for a in range(3) if a != SLICE_AXES[slice_axis]]
        else:
            a, b, _ = nifti_axes(image.header, max(2, min(3, len(image.shape))))
            in_plane = [shape[a], shape[b]]
        check_pixel_count(in_plane[1], in_plane[0], max_pixels, "a slice")
        check_nifti_size(image, path, max_pixels)
        if layout == "canonical":
            image = nib.as_closest_canonical(image)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    return image


def read_nifti(path, slice_axis="axial", volume_index=0, modality=None, patient_id=None, max_pixels=None,
               layout="canonical"):
    """A NIfTI file; returns a list of volumes, one per 3-D volume read.

    ``layout="canonical"`` (conversion into records) reorients to closest canonical (RAS)
    and slices along ``slice_axis``; ``layout="native"`` (upscaling, which writes the
    file back) keeps the file's own array layout (:func:`nifti_axes`; ``slice_axis`` is
    not used) and sets each volume's ``native`` to the nibabel image. Either way the
    modality and window come from :func:`nifti_modality_and_window`, volume by volume.
    """
    if layout not in ("canonical", "native"):
        raise ValueError(f"layout must be 'canonical' or 'native', got {layout!r}")
    image = _load_nifti(path, layout, slice_axis, max_pixels)
    try:
        data = image.get_fdata(dtype=np.float32, caching="unchanged")
    except Exception as exc:
        raise InputError(f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    if data.size == 0 or data.ndim < 2:
        raise InputError(f"zero-size or 1-D image {data.shape}")
    if not np.all(np.isfinite(data)):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise InputError(f"contains {bad} NaN or Inf voxel(s)")
    if layout == "native":
        return _native_volumes(path, image, data, modality, patient_id, volume_index)
    while data.ndim > 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, np.newaxis]
    if data.ndim == 3:
        volumes = [(None, data)]
    elif data.ndim == 4:
        volumes = [(t, data[..., t]) for t in _volume_indices(data.shape[3], volume_index)]
    else:
        raise InputError(f"unsupported NIfTI dimensionality {data.shape}")
    zooms = image.header.get_zooms()[:3]
    pid = patient_id or nifti_stem(path)
    out = []
    for t, volume in volumes:
        kind, window = nifti_modality_and_window(volume, modality)
        slices, spacing = nifti_slices(volume, zooms, slice_axis)
        source = path if t is None else f"{path}#volume={t}"
        out.append(Volume(slices, kind, pid, source, spacing, window, file_format="nifti"))
    return out


def _volume_indices(count, volume_index):
    if volume_index == "all":
        return list(range(count))
    t = int(volume_index)
    if not 0 <= t < count:
        raise InputError(f"--volume_index={t} out of range for a 4-D volume of {count} volumes")
    return [t]


def _native_volumes(path, image, data, modality, patient_id, volume_index):
    """The volumes of ``data`` (own layout) as :func:`read_nifti` returns them for
    ``layout="native"``: slices as :func:`native_slices` orders them, volume by volume."""
    axes = nifti_axes(image.header, data.ndim)
    zooms = image.header.get_zooms()
    spacing = (float(zooms[axes[1]]), float(zooms[axes[0]]))
    depth = 1 if axes[2] is None else data.shape[axes[2]]
    stack = native_slices(data, axes)  # a view: (volumes * depth, H, W)
    count = stack.shape[0] // depth
    pid = patient_id or nifti_stem(path)
    out = []
    for t in _volume_indices(count, volume_index):
        slices = stack[t * depth:(t + 1) * depth]
        kind, window = nifti_modality_and_window(slices, modality)
        source = path if data.ndim <= 3 else f"{path}#volume={t}"
        out.append(Volume(list(slices), kind, pid, source, spacing, window,
                          slice_indices=list(range(t * depth, (t + 1) * depth)), native=image,
                          file_format="nifti"))
    return out


# Deflate expands at most 1032:1, so a gzipped file of n bytes holds at most 1032 n.
GZIP_MAX_RATIO = 1032


def check_nifti_size(image, path, max_pixels=None):
    """InputError, from the header alone, when a NIfTI image claims more voxels than one
    file may hold (``check_file_pixel_count``) or more bytes than its file can hold:
    nibabel allocates what the header claims before reading, so a small file claiming a
    huge volume would cost that memory, however little data follows."""
    shape = tuple(int(n) for n in image.shape)
    count = math.prod(shape)
    check_file_pixel_count(count, f"a volume of {' x '.join(map(str, shape))} voxels", max_pixels)
    claimed = int(image.dataobj.offset) + count * image.get_data_dtype().itemsize
    size = os.path.getsize(path)
    gzipped = path.lower().endswith(".gz")
    if claimed > size * (GZIP_MAX_RATIO if gzipped else 1):
        raise InputError(f"the header claims {claimed} bytes of voxel data, more than the file of {size} bytes "
                         f"{'can expand to' if gzipped else 'holds'} (truncated or corrupt)")


def looks_like_ct(volume):
    """CT in HU has air near -1000 in quantity; MR has at most a few negative voxels.

    The 1st percentile below -500 tells the two apart without trusting the minimum,
    which can be a single negative outlier in an MR reconstruction.
    """
    return float(np.percentile(volume, 1)) < -500.0


def nifti_stem(path):
    name = os.path.basename(path)
    for ext in NIFTI_EXTENSIONS[::-1]:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


# ----------------------------------------------------------------------------- raster


def raster_size(data):
    """(height, width) from a PNG/JPEG/TIFF header (Pillow reads no pixels), or None."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's own bomb warning: the caller decides
            previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                with Image.open(io.BytesIO(data)) as header:
                    width, height = header.size
            finally:
                Image.MAX_IMAGE_PIXELS = previous
    except Exception:  # not a format Pillow knows: OpenCV will say
        return None
    return height, width


def read_raster(path, modality="DX", patient_id=None, max_pixels=None):
    """PNG (8/16 bit), JPEG or TIFF X-ray; colour converted to luminance.

    The file is read as bytes and decoded from memory (so any file name works, whatever
    its encoding), after its header's size is checked against ``max_pixels``."""
    import cv2

    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise InputError("empty file (0 bytes)")
    size = raster_size(data)
    if size is not None:
        check_pixel_count(*size, max_pixels)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InputError("not a decodable PNG/JPEG/TIFF image (truncated or corrupt?)")
    if image.ndim == 3:
        code = {3: cv2.COLOR_BGR2GRAY, 4: cv2.COLOR_BGRA2GRAY}.get(image.shape[2])
        if code is None:
            if image.shape[2] != 1:
                raise InputError(f"unsupported channel count {image.shape[2]}")
            image = image[..., 0]
        else:
            image = cv2.cvtColor(image, code)
    _check_shape(image, path)
    if image.dtype == np.uint8:
        default = intensity.xray_range(8)
    elif image.dtype == np.uint16:
        default = intensity.xray_range(16)
    else:
        default = percentile_window(image)
    # Exactly [0, 255] / [0, 65535] for 8- / 16-bit input; anything else (float or
    # 32-bit TIFF) is written back as a 16-bit PNG of its window.
    bits = 8 if image.dtype == np.uint8 else 16
    stem = os.path.splitext(os.path.basename(path))[0]
    return Volume([image.astype(np.float32)], modality, patient_id or stem, path, (0.0, 0.0), default,
                  file_format="raster", native={"bits": bits})


def patient_from_path(path, pattern):
    """Patient id from the first group of ``pattern`` searched in the file name, else None."""
    if not pattern:
        return None
    match = re.search(pattern, os.path.basename(path))
    if match is None:
        return None
    return match.group(1) if match.groups() else match.group(0)


# ----------------------------------------------------------------------------- one file for a model


@dataclasses.dataclass
class Image:
    """One file as a model sees it, and what writing it back needs: its volumes' slices
    stacked, each mapped to [0, 1] through its own volume's window, exactly as conversion
    maps them into records (``sr_tf.intensity``)."""

    path: str
    kind: str  # "dicom" | "nifti" | "raster"
    slices: np.ndarray  # (S, H, W) float32 in [0, 1]: intensity.to_unit(physical, lo, hi)
    windows: np.ndarray  # (S, 2) float64: the physical values mapped to 0 and 1, slice by slice
    modality: str  # "CT", "CR", "DX", "MR", ...
    pixel_spacing: tuple  # (row, col) mm, (0, 0) when unknown
    source: object  # what a writer needs: Volume.native
    # (S, H, W) float32 physical values when some lie outside their window (carried into
    # the output by nearest neighbour: sr_tf.io.writers), else None.
    physical: np.ndarray = None

    def window(self, index=0):
        """``(lo, hi)`` of slice ``index``: the physical values mapped to 0 and 1."""
        lo, hi = self.windows[index]
        return float(lo), float(hi)


def _check_writable(ds):
    if "PixelData" not in ds:  # float pixel data decodes, but is not written back
        raise InputError("float pixel data (FloatPixelData / DoubleFloatPixelData) is not supported")
    bits = int(ds.get("BitsAllocated", 0))
    if bits not in (8, 16, 32):
        raise InputError(f"BitsAllocated {bits} (e.g. a binary segmentation) cannot be upscaled")


def read_volumes(path, modality=None, window=None, max_pixels=None):
    """The volumes of one file, read so that it can be written back (``Volume.native``
    set): a DICOM file (its frames), every volume of a NIfTI file in its own layout, a
    raster. ``modality`` (NIfTI and raster) and ``window`` override what the file says,
    as conversion's options do. InputError with the reason when it cannot be read."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError("no such file")
    kind = detect_format(path)
    if kind is None:
        raise InputError("unknown format (expected DICOM, NIfTI .nii/.nii.gz, or PNG/JPEG/TIFF)")
    if kind == "dicom":
        volume = read_dicom(path, max_pixels, window)
        _check_writable(volume.native)
        return [volume]
    if kind == "nifti":
        volumes = read_nifti(path, volume_index="all", modality=modality, max_pixels=max_pixels, layout="native")
    else:
        volumes = [read_raster(path, modality or "DX", max_pixels=max_pixels)]
    if window is not None:
        for volume in volumes:
            volume.intensity_range = tuple(window)
    return volumes


def load_image(path, modality=None, window=None, max_pixels=None):
    """One file as an :class:`Image` (:func:`read_volumes`' arguments). Physical values
    outside the window are kept for the writers (rasters have none outside theirs)."""
    volumes = read_volumes(path, modality, window, max_pixels)
    first = volumes[0]
    physical = np.stack([np.asarray(s, np.float32) for volume in volumes for s in volume.slices])
    windows = np.array([volume.intensity_range for volume in volumes for _ in volume.slices], np.float64)
    lo, hi = windows[:, :1, None], windows[:, 1:, None]
    slices = intensity.to_unit(physical, lo, hi)
    outside = first.file_format != "raster" and bool(np.any((physical < lo) | (physical > hi)))
    return Image(path, first.file_format, slices, windows, first.modality,
                 tuple(float(v) for v in first.pixel_spacing), first.native, physical if outside else None)
