"""Synthetic ADNI downloads and BIDS datasets: tiny volumes, real DICOM written with pydicom."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

# Shape of the DICOM volume as (rows, columns, slices): dcm2niix writes it as (columns, rows, slices).
DICOM_SHAPE = (14, 16, 12)
PIXEL_SPACING = (1.0, 1.2)  # DICOM order: between rows (y), between columns (x)
SLICE_THICKNESS = 1.5


def write_dicom_series(
    folder: Path, volume: np.ndarray, description: str, date: str, patient_id: str
) -> None:
    """Write ``volume`` (rows, columns, slices; uint16) as an axial MR Image Storage series, one file per slice."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rows, columns, slices = volume.shape
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(slices):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
        ds.Modality, ds.Manufacturer, ds.MagneticFieldStrength = "MR", "SIEMENS", 3
        ds.PatientID, ds.PatientName = patient_id, "Anonymous"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = "082030"
        ds.SeriesNumber, ds.AcquisitionNumber, ds.InstanceNumber = 2, 1, k + 1
        ds.SeriesDescription = ds.ProtocolName = description
        ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "GR\\IR", "SP\\MP", "3D"
        ds.RepetitionTime, ds.EchoTime, ds.InversionTime, ds.FlipAngle = 2300, 2.98, 900, 9
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-8.0, -8.0, -9.0 + k * SLICE_THICKNESS]
        ds.SliceLocation = -9.0 + k * SLICE_THICKNESS
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.SliceThickness = ds.SpacingBetweenSlices = SLICE_THICKNESS
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(volume[:, :, k], dtype=np.uint16).tobytes()
        path = folder / f"ADNI_{patient_id}_MR_{description}_{k + 1:03d}.dcm"
        if int(pydicom.__version__.split(".")[0]) >= 3:
            ds.save_as(path, enforce_file_format=True)
        else:  # pydicom 2.x
            ds.is_little_endian, ds.is_implicit_VR = True, False
            ds.save_as(path, write_like_original=False)


def write_nifti(path: Path, shape: tuple[int, ...] = (16, 16, 12), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).random(shape, dtype=np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.2, 1.0])), str(path))
    return path


def write_garbage(path: Path, size: int = 400) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def dicom_volume() -> np.ndarray:
    return np.arange(np.prod(DICOM_SHAPE), dtype=np.uint16).reshape(DICOM_SHAPE)


@pytest.fixture(scope="session")
def dicom_facts() -> dict:
    """What the synthetic DICOM series holds, for checking dcm2niix's output."""
    return {
        "shape": DICOM_SHAPE,
        "spacing": PIXEL_SPACING,
        "thickness": SLICE_THICKNESS,
        "volume": dicom_volume(),
    }


@pytest.fixture(scope="session")
def adni_download(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<tmp>/download/ADNI/<PTID>/...`` + ``<tmp>/download/ADNIMERGE.csv``; see each participant's note."""
    top = tmp_path_factory.mktemp("adni") / "download"
    adni = top / "ADNI"

    def image(ptid: str, series: str, date: str, image_id: str) -> Path:
        return adni / ptid / series / f"{date}_08_20_30.0" / image_id

    # 0001 CN M: baseline DICOM (converted), a NIfTI a year later, a localizer the baseline day.
    write_dicom_series(
        image("002_S_0001", "MPRAGE", "2006-04-18", "I40001"),
        dicom_volume(),
        "MPRAGE",
        "20060418",
        "002_S_0001",
    )
    write_nifti(
        image("002_S_0001", "MPRAGE", "2007-04-20", "I80001") / "ADNI_002_S_0001_MR_MPRAGE_I80001.nii.gz"
    )
    write_nifti(
        image("002_S_0001", "Localizer", "2006-04-18", "I40000") / "ADNI_002_S_0001_MR_Localizer_I40000.nii"
    )
    # 0002 CN F (SMC at baseline in DX_bl): an uncompressed NIfTI.
    write_nifti(
        image("002_S_0002", "MP-RAGE", "2010-01-05", "I200001") / "ADNI_002_S_0002_MR_MP-RAGE_I200001.nii"
    )
    # 0003 AD: dropped for diagnosis.
    write_nifti(
        image("002_S_0003", "MPRAGE", "2006-05-02", "I300001") / "ADNI_002_S_0003_MR_MPRAGE_I300001.nii.gz"
    )
    # 0004: no ADNIMERGE row.
    write_nifti(
        image("002_S_0004", "MPRAGE", "2006-06-01", "I400001") / "ADNI_002_S_0004_MR_MPRAGE_I400001.nii.gz"
    )
    # 0005 CN: only a localizer and a calibration scan.
    write_nifti(image("002_S_0005", "3-plane_localizer", "2006-07-01", "I500001") / "loc.nii.gz")
    write_nifti(image("002_S_0005", "Calibration_Scan", "2006-07-01", "I500002") / "cal.nii.gz")
    # 0006 CN: a DICOM series truncated after the header, dcm2niix finds no valid image.
    bad = image("002_S_0006", "MPRAGE", "2006-08-01", "I600001")
    write_dicom_series(bad, dicom_volume(), "MPRAGE", "20060801", "002_S_0006")
    for f in bad.iterdir():
        f.write_bytes(f.read_bytes()[:600])
    # 0007 CN: IR-SPGR scanned 508 days after its only visit (dropped at 180 days' tolerance).
    write_nifti(
        image("002_S_0007", "IR-SPGR", "2012-06-01", "I700001") / "ADNI_002_S_0007_MR_IR-SPGR_I700001.nii.gz"
    )
    # 0008 CN: a NIfTI that is not one.
    write_garbage(
        image("002_S_0008", "MPRAGE", "2006-09-01", "I800001") / "ADNI_002_S_0008_MR_MPRAGE_I800001.nii.gz"
    )
    # 0009 CN: the MPRAGE fails to convert, its same-day repeat is used instead.
    bad = image("002_S_0009", "MPRAGE", "2006-10-02", "I900001")
    write_dicom_series(bad, dicom_volume(), "MPRAGE", "20061002", "002_S_0009")
    for f in bad.iterdir():
        f.write_bytes(f.read_bytes()[:600])
    write_nifti(
        image("002_S_0009", "MPRAGE_Repeat", "2006-10-02", "I900002")
        / "ADNI_002_S_0009_MR_MPRAGE_Repeat.nii.gz"
    )
    # ... and a later scan matched to m06, whose DX is empty (the 'latest' visit has no diagnosis).
    write_nifti(
        image("002_S_0009", "MPRAGE", "2007-03-22", "I950001") / "ADNI_002_S_0009_MR_MPRAGE_I950001.nii.gz"
    )

    # ADNIMERGE with its real column names (a subset of its ~100), one row per visit.
    rows = [
        # RID, PTID, VISCODE, EXAMDATE, DX_bl, DX, AGE, PTGENDER
        (1, "002_S_0001", "bl", "2006-04-10", "CN", "CN", 74.2, "Male"),
        (1, "002_S_0001", "m06", "2006-10-12", "CN", "CN", 74.2, "Male"),
        (1, "002_S_0001", "m12", "2007-04-25", "CN", "CN", 74.2, "Male"),
        (2, "002_S_0002", "bl", "2009-12-20", "SMC", "CN", 70.3, "Female"),
        (3, "002_S_0003", "bl", "2006-04-30", "AD", "Dementia", 81.0, "Female"),
        (5, "002_S_0005", "bl", "2006-07-01", "CN", "CN", 66.0, "Male"),
        (6, "002_S_0006", "bl", "2006-07-28", "CN", "CN", 71.5, "Female"),
        (7, "002_S_0007", "bl", "2011-01-10", "CN", "CN", 68.0, "Male"),
        (8, "002_S_0008", "bl", "2006-09-01", "CN", "CN", 77.0, "Female"),
        (9, "002_S_0009", "bl", "2006-09-20", "CN", "CN", 72.0, "Female"),
        (9, "002_S_0009", "m06", "2007-03-20", "CN", "", 72.0, "Female"),
        (10, "002_S_0010", "bl", "2006-01-01", "CN", "CN", 60.0, "Male"),  # not downloaded: not reported
    ]
    frame = pd.DataFrame(
        rows, columns=["RID", "PTID", "VISCODE", "EXAMDATE", "DX_bl", "DX", "AGE", "PTGENDER"]
    )
    frame.insert(1, "COLPROT", "ADNI1")
    frame["PTEDUCAT"], frame["APOE4"], frame["MMSE"] = 16, 0, 29
    frame.to_csv(top / "ADNIMERGE.csv", index=False)
    return top


@pytest.fixture(scope="session")
def adni_series_download(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ADNI download of NIfTIs only (no dcm2niix needed) for the series choice; see each note."""
    top = tmp_path_factory.mktemp("adni_series") / "download"

    def nifti(ptid: str, series: str, date: str, image_id: str, seed: int = 0) -> Path:
        folder = top / "ADNI" / ptid / series / f"{date}_09_00_00.0" / image_id
        return write_nifti(folder / f"ADNI_{ptid}_MR_{image_id}.nii.gz", seed=seed)

    # 0001: the raw MPRAGE, the archive's preprocessed version of it (sorts first by name), two
    # reformats, two post-contrast series and a localizer, all the same day.
    for series, image_id in [
        ("MPR__GradWarp__B1_Correction__N3__Scaled", "I1001"),
        ("MPRAGE", "I1002"),
        ("MPRAGE_MPR_Cor", "I1003"),
        ("MPR_Cor", "I1004"),
        ("Axial_T1_Post", "I1005"),
        ("T1+C", "I1006"),
        ("Localizer", "I1000"),
    ]:
        nifti("003_S_0001", series, "2010-01-05", image_id)
    # 0002: only the preprocessed version was downloaded: taken, as the fallback.
    nifti("003_S_0002", "MPR__GradWarp__B1_Correction__N3__Scaled", "2010-02-01", "I2001")
    # 0003: only a reformat and a post-contrast T1.
    nifti("003_S_0003", "MPRAGE_MPR_Cor", "2010-03-01", "I3001")
    nifti("003_S_0003", "Axial_T1_Post", "2010-03-01", "I3002")
    # 0004: DX empty at baseline, DX_bl CN.
    nifti("003_S_0004", "MPRAGE", "2010-04-01", "I4001")
    # 0005: ADNI3's sagittal acquisition, which is not a reformat.
    nifti("003_S_0005", "Accelerated_Sagittal_MPRAGE", "2017-05-02", "I5001")
    rows = [
        ("003_S_0001", "bl", "2010-01-04", "CN", "CN", 70.0, "Male"),
        ("003_S_0002", "bl", "2010-02-01", "CN", "CN", 71.0, "Female"),
        ("003_S_0003", "bl", "2010-03-01", "CN", "CN", 72.0, "Male"),
        ("003_S_0004", "bl", "2010-04-01", "CN", "", 73.0, "Female"),
        ("003_S_0005", "bl", "2017-05-01", "CN", "CN", 74.0, "Male"),
    ]
    columns = ["PTID", "VISCODE", "EXAMDATE", "DX_bl", "DX", "AGE", "PTGENDER"]
    pd.DataFrame(rows, columns=columns).to_csv(top / "ADNIMERGE.csv", index=False)
    return top


@pytest.fixture(scope="session")
def bids_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BIDS dataset; see each participant's note."""
    root = tmp_path_factory.mktemp("bids") / "ds"
    # sub-01: two sessions, three runs in the first; sessions.tsv carries the age per session.
    for run in (2, 10, 1):
        write_nifti(root / f"sub-01/ses-01/anat/sub-01_ses-01_run-{run}_T1w.nii.gz", seed=run)
    write_nifti(root / "sub-01/ses-02/anat/sub-01_ses-02_T1w.nii.gz")
    (root / "sub-01/sub-01_sessions.tsv").write_text("session_id\tage\nses-01\t34.6\nses-02\t36.1\n")
    write_nifti(root / "sub-02/anat/sub-02_T1w.nii")  # no sessions, sex 'male'
    write_nifti(root / "sub-03/anat/sub-03_T1w.nii.gz")  # not in participants.tsv
    write_nifti(root / "sub-04/ses-01/anat/sub-04_ses-01_acq-mprage_T1w.nii.gz")  # age 89+, sex code 1
    # sub-05 is listed but has no folder
    write_nifti(root / "sub-06/anat/sub-06_T1w.nii.gz")  # group AD
    write_nifti(root / "sub-07/anat/sub-07_T1w.nii.gz")  # age n/a
    write_nifti(root / "sub-08/anat/sub-08_T2w.nii.gz")  # no T1w
    write_garbage(root / "sub-09/anat/sub-09_T1w.nii.gz")  # unreadable
    (root / "participants.tsv").write_text(
        "participant_id\tage\tsex\tgroup\n"
        "sub-01\t34.5\tF\tCN\n"
        "sub-02\t61\tmale\tCN\n"
        "04\t89+\t1\tCN\n"
        "sub-05\t40\tM\tCN\n"
        "sub-06\t50.25\tfemale\tAD\n"
        "sub-07\tn/a\tM\tCN\n"
        "sub-08\t30\tF\tCN\n"
        "sub-09\t45\tM\tCN\n"
    )
    (root / "dataset_description.json").write_text('{"Name": "tiny", "BIDSVersion": "1.8.0"}\n')
    return root
