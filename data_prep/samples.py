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


def sample_paths():
    """Absolute paths of the sample files; a clear error when a package is missing."""
    try:
        from pydicom.data import get_testdata_file
    except ImportError as exc:  # pragma: no cover - pydicom is a hard dependency
        raise RuntimeError("the sample set needs pydicom and pydicom-data installed") from exc
    paths = []
    for name in SAMPLE_DICOMS:
        path = get_testdata_file(name)
        if path is None:
            raise RuntimeError(f"{name} not found: install pydicom-data (pip install pydicom-data)")
        paths.append(str(path))
    try:
        from nilearn.datasets import MNI152_FILE_PATH
    except ImportError as exc:
        raise RuntimeError("the MNI152 sample volume needs nilearn (pip install nilearn)") from exc
    paths.append(str(MNI152_FILE_PATH))
    return paths
