"""The embedded sample set: real clinical files that ship inside PyPI packages.

From pydicom-data: a chest radiograph (CR, MONOCHROME1, 15 bit), two head CTs and a
small CT; from nilearn: the MNI152 T1 brain volume. There are only five patients, so
a hash split would leave val or test empty; the split is fixed per patient instead,
still by patient (no patient in two splits), and the same on every run.
"""

SAMPLE_DICOMS = ("RG1_UNCI.dcm", "693_UNCI.dcm", "eCT_Supplemental.dcm", "CT_small.dcm")

# patient_id -> split. The radiograph, the 512x512 head CT and the MR volume train;
# the two-frame enhanced CT validates; the small CT is held out for testing.
SAMPLE_SPLITS = {
    "9RG1": "train",  # RG1_UNCI.dcm, CR 1955x1841
    "CQ500-CT-310": "train",  # 693_UNCI.dcm, CT 512x512
    "mni_icbm152_t1_tal_nlin_sym_09a_converted": "train",  # MNI152 T1, 189 axial slices
    "0010": "val",  # eCT_Supplemental.dcm, enhanced CT, 2 frames
    "1CT1": "test",  # CT_small.dcm, CT 128x128
}


# The development held-out set: real images of modalities and scanners the sample set
# lacks, for quality figures of trained models (never for training). From pydicom-data,
# but MR_small.dcm, which ships with pydicom itself.
DEVELOPMENT_DICOMS = ("MR-SIEMENS-DICOM-WithOverlays.dcm", "explicit_VR-UN.dcm", "MR_small.dcm", "emri_small.dcm")
# Every patient of the development set is a test patient.
DEVELOPMENT_SPLITS = {
    "021234567": "test",  # MR-SIEMENS-DICOM-WithOverlays.dcm, MR 484x484, 12 bit
    "PANCREAS_0001": "test",  # explicit_VR-UN.dcm, abdominal CT 512x512
    "4MR1": "test",  # MR_small.dcm, MR 64x64
    # emri_small.dcm, MR 64x64, 10 frames; no PatientID: the SeriesInstanceUID stands in
    "1.2.826.0.1.3680043.2.1143.3712364435022872412969836992152438492": "test",
}


def _testdata_paths(names):
    try:
        from pydicom.data import get_testdata_file
    except ImportError as exc:  # pragma: no cover - pydicom is a hard dependency
        raise RuntimeError("the sample set needs pydicom and pydicom-data installed") from exc
    paths = []
    for name in names:
        path = get_testdata_file(name)
        if path is None:
            raise RuntimeError(f"{name} not found: install pydicom-data (pip install pydicom-data)")
        paths.append(str(path))
    return paths


def development_paths():
    """Absolute paths of the development held-out files."""
    return _testdata_paths(DEVELOPMENT_DICOMS)


def sample_paths():
    """Absolute paths of the sample files; a clear error when a package is missing."""
    paths = _testdata_paths(SAMPLE_DICOMS)
    try:
        from nilearn.datasets import MNI152_FILE_PATH
    except ImportError as exc:
        raise RuntimeError("the MNI152 sample volume needs nilearn (pip install nilearn)") from exc
    paths.append(str(MNI152_FILE_PATH))
    return paths
