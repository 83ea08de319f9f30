"""CT volumes in and label maps out: NIfTI-1/2 (plain or gzipped), a DICOM series (zip) or one DICOM file.

Internally a volume is float32 Hounsfield units in (z, y, x) order with its
spacing in mm; the NIfTI it came from (or the one built from the DICOM
geometry) is stored in (x, y, z) order with its affine, and label maps go back
in that same layout and affine. The format is read from the bytes themselves.
"""

from __future__ import annotations

import functools
import gzip
import io
import logging
import threading
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from migserve.types import Array

from ..errors import TooLarge, Unprocessable, UnsupportedMedia

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
UNPACK_STEP = 1 << 20  # a gzip is inflated this much at a time, each step counted as it comes


@dataclass(frozen=True)
class Volume:
    hu: Array  # float32 [z, y, x]
    spacing: tuple[float, float, float]  # mm, (z, y, x)
    affine: Array  # 4x4, voxel (x, y, z) -> RAS mm
    source: str  # "nifti" or "dicom"

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0


@functools.cache
def _quiet_readers() -> None:
    """Import nibabel and pydicom, and quiet them. At a volume's first use, or in a thread as a gateway starts to serve
    a CT model (`import_readers_soon`), not at every gateway start: with scipy's ndimage they take about 0.6 s of CPU
    to import, which a gateway serving no CT model (and each of its front-end processes) spent at start.

    A client's damaged file is answered 422 with what was wrong. The readers also logged it: nibabel at ERROR, twice
    (its own handler and the root's), pydicom as a warning and again through the warnings module (for what it
    tolerates too: an unknown character set, a VR other than the header says), which put a client's mistake in the
    operator's log as if it were the gateway's. Their problems still raise where they did."""
    import nibabel.imageglobals
    import pydicom.config

    nibabel.imageglobals.logger.setLevel(logging.CRITICAL + 1)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


@functools.cache
def import_readers_soon() -> None:
    """Import the readers (and scipy's ndimage) in a daemon thread, once a process: for a gateway that serves a CT
    model, as it starts serving it, so that its first volume does not wait for them (before, the first
    /v1/lns/segment after a start took 0.7 s where the next took 0.2: `bench/restart.py --first-ct`). The start is
    not held up; a volume that comes while the thread imports waits for the import, as it would have done it."""

    def run() -> None:
        from scipy import ndimage  # noqa: F401  (resample's)

        _quiet_readers()

    threading.Thread(target=run, name="ct-readers", daemon=True).start()


def sniff(data: bytes) -> str | None:
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    if data[:4] == b"PK\x03\x04":
        return "zip"
    if data[128:132] == b"DICM":
        return "dicom"
    if int.from_bytes(data[:4], "little") in (348, 540) or int.from_bytes(data[:4], "big") in (348, 540):
        return "nifti"
    return None


def read_volume(data: bytes, *, max_bytes: int, max_voxels: int, unpacking: Callable[[int], None] = lambda n: None) -> Volume:
    """The volume in `data`. A gzip or zip is unpacked up to `max_bytes` (413 past it), and `unpacking` is told of
    the bytes as they come: a gzip's a step of UNPACK_STEP at a time, a zip's all at once before it is read, from
    its directory (service/api/v1.py counts them in --max-pending-mb; it raises to stop the unpacking)."""
    kind = sniff(data)
    if kind == "gzip":
        data = _gunzip(data, max_bytes, unpacking)
        if sniff(data) != "nifti":
            raise UnsupportedMedia("volume: a gzip file that does not hold a NIfTI image")
        kind = "nifti"
    if kind == "nifti":
        volume = _nifti(data, max_voxels)
    elif kind == "zip":
        volume = _dicom_series(_zip_members(data, max_bytes, unpacking))
    elif kind == "dicom":
        volume = _dicom_series([("upload", data)])
    else:
        raise UnsupportedMedia("volume: not NIfTI (.nii, .nii.gz), a zip of DICOM files, or a DICOM file")
    if volume.hu.size > max_voxels:
        raise TooLarge(f"volume: {volume.hu.size} voxels is over the limit of {max_voxels}")
    _check_affine(volume)
    return volume


def _check_affine(volume: Volume) -> None:
    """The label map goes back with the input's affine, which nibabel must decompose into a header: one with NaN
    or infinity, or that maps the voxels onto a plane, failed there, after the whole volume had been segmented."""
    rotation_zooms = volume.affine[:3, :3]
    if not np.isfinite(volume.affine).all() or abs(float(np.linalg.det(rotation_zooms))) < 1e-12:
        where = "its header's sform or qform" if volume.source == "nifti" else "its slices' orientation and positions"
        raise Unprocessable(f"volume: the voxel-to-world affine from {where} is not usable: {volume.affine.round(4).tolist()}")


def _gunzip(data: bytes, max_bytes: int, unpacking: Callable[[int], None]) -> bytes:
    out = io.BytesIO()  # its getvalue() hands over the bytes it grew, where a bytearray's would be copied once more
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as fh:
            while out.tell() <= max_bytes and (chunk := fh.read(min(UNPACK_STEP, max_bytes + 1 - out.tell()))):
                unpacking(len(chunk))
                out.write(chunk)
    except (OSError, EOFError, zlib.error) as exc:  # zlib's: a damaged deflate stream, gzip's own: a bad header or CRC
        raise Unprocessable(f"volume: corrupt gzip data ({exc})") from None
    if out.tell() > max_bytes:
        raise TooLarge(f"volume: decompresses to more than {max_bytes} bytes")
    return out.getvalue()


def _nifti(data: bytes, max_voxels: int) -> Volume:
    import nibabel as nib

    _quiet_readers()
    big = int.from_bytes(data[:4], "big") in (348, 540)
    image_class = nib.Nifti2Image if int.from_bytes(data[:4], "big" if big else "little") == 540 else nib.Nifti1Image
    try:
        image = image_class.from_bytes(data)
        shape = tuple(int(n) for n in image.header.get_data_shape())
        if (voxels := int(np.prod(shape, dtype=object))) > max_voxels:  # before reading: the header alone says it
            raise TooLarge(f"volume: the NIfTI header gives shape {list(shape)}, {voxels} voxels, over the limit of {max_voxels}")
        if (dtype := image.header.get_data_dtype()).kind not in "biuf":  # complex: numpy would drop the imaginary part
            raise Unprocessable(f"volume: NIfTI voxels of type {dtype}; a CT volume holds real numbers (Hounsfield units)")
        array = np.asarray(image.dataobj, dtype=np.float32)
    except (TooLarge, Unprocessable):
        raise
    except Exception as exc:  # nibabel raises a dozen kinds on a bad header or short data
        raise Unprocessable(f"volume: bad NIfTI file ({type(exc).__name__}: {exc})") from None
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise Unprocessable(f"volume: expected a 3D CT volume, the NIfTI holds shape {list(array.shape)}")
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        raise Unprocessable(f"volume: NIfTI voxel sizes {list(zooms)} are not all positive")
    if not np.isfinite(array).all():
        raise Unprocessable("volume: contains NaN or infinite voxels")
    affine = image.affine if image.affine is not None else np.diag([*zooms, 1.0])
    return Volume(np.ascontiguousarray(array.transpose(2, 1, 0)), (zooms[2], zooms[1], zooms[0]), np.asarray(affine, float), "nifti")


def _zip_members(data: bytes, max_bytes: int, unpacking: Callable[[int], None]) -> list[tuple[str, bytes]]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = [i for i in archive.infolist() if not i.is_dir() and not i.filename.startswith("__MACOSX/")]
        if (size := sum(i.file_size for i in infos)) > max_bytes:
            raise TooLarge(f"volume: the zip unpacks to more than {max_bytes} bytes")
        unpacking(size)  # zipfile reads no member past the size the directory gives it
        return [(i.filename, archive.read(i)) for i in infos]
    # zlib's error: a damaged deflate stream; ValueError: a name that is not the UTF-8 its flag says; RuntimeError:
    # an encrypted member, or (its subclass NotImplementedError) a compression method zipfile lacks
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, zlib.error, ValueError, RuntimeError) as exc:
        raise Unprocessable(f"volume: broken zip file ({exc})") from None


@dataclass(frozen=True)
class _Slice:
    position: Array  # ImagePositionPatient, mm (LPS)
    pixels: Array  # HU [rows, cols]


def _dicom_series(members: list[tuple[str, bytes]]) -> Volume:
    if not members:
        raise Unprocessable("volume: the zip holds no files")
    import pydicom
    from pydicom.errors import InvalidDicomError

    _quiet_readers()
    slices: list[_Slice] = []
    geometry: tuple[Array, Array, float] | None = None  # row and column cosines, slice thickness
    spacing: tuple[float, float] | None = None
    for name, raw in members:
        try:
            ds = pydicom.dcmread(io.BytesIO(raw))
            pixels = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
            orientation = np.asarray([float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])])
            position = np.asarray([float(v) for v in ds.get("ImagePositionPatient", [0, 0, len(slices)])])
            pixel_spacing = tuple(float(v) for v in ds.get("PixelSpacing", [1.0, 1.0]))
            thickness = float(ds.get("SpacingBetweenSlices", ds.get("SliceThickness", 1.0)) or 1.0)
        except InvalidDicomError:
            raise Unprocessable(f"volume: {name} is not a DICOM file") from None
        except Exception as exc:  # pydicom raises many kinds on damaged elements or pixel data
            raise Unprocessable(f"volume: broken DICOM file {name} ({type(exc).__name__}: {exc})") from None
        if pixels.ndim != 2:
            raise Unprocessable(f"volume: {name} holds pixel data of shape {list(pixels.shape)}; expected one 2D slice per file")
        if slices and pixels.shape != slices[0].pixels.shape:
            raise Unprocessable(f"volume: {name} is {list(pixels.shape)}, other slices are {list(slices[0].pixels.shape)}")
        if len(pixel_spacing) != 2 or min(pixel_spacing) <= 0 or orientation.shape != (6,):
            raise Unprocessable(f"volume: {name} has an unusable PixelSpacing or ImageOrientationPatient")
        geometry = geometry or (orientation[:3], orientation[3:], thickness)
        spacing = spacing or (pixel_spacing[0], pixel_spacing[1])
        slices.append(_Slice(position, pixels))
    assert geometry is not None and spacing is not None  # members is not empty
    row_cos, col_cos, thickness = geometry
    normal = np.cross(row_cos, col_cos)
    slices.sort(key=lambda s: float(s.position @ normal))
    steps = np.diff([float(s.position @ normal) for s in slices])
    if len(steps) and steps.min() <= 1e-3:
        raise Unprocessable("volume: two DICOM slices share a position; upload one series at a time")
    dz = float(np.median(steps)) if len(steps) else thickness
    lps = np.eye(4)
    lps[:3, 0] = row_cos * spacing[1]  # x (column index) runs along the row direction
    lps[:3, 1] = col_cos * spacing[0]
    lps[:3, 2] = normal * dz
    lps[:3, 3] = slices[0].position
    hu = np.stack([s.pixels for s in slices])
    return Volume(hu, (dz, spacing[0], spacing[1]), LPS_TO_RAS @ lps, "dicom")


def resample(values: Array, spacing: tuple[float, float, float], target: tuple[float, float, float]) -> Array:
    """Trilinear resampling of [z, y, x] from spacing to target spacing (at least one voxel per axis)."""
    from scipy import ndimage

    factors = [max(s / t, 1.0 / n) for s, t, n in zip(spacing, target, values.shape, strict=True)]
    return np.asarray(ndimage.zoom(values, factors, order=1, mode="nearest", grid_mode=True), dtype=np.float32)


def back_to_grid(labels: Array, shape: tuple[int, ...]) -> Array:
    """Nearest-neighbour map of labels on a resampled grid back to the input's [z, y, x] shape."""
    index = [np.minimum(((np.arange(n) + 0.5) * m / n).astype(int), m - 1) for n, m in zip(shape, labels.shape, strict=True)]
    return np.asarray(labels[np.ix_(*index)])


def window(hu: Array, low: float, high: float) -> Array:
    """HU clipped to [low, high] and scaled to [0, 1], float32, in one array (no temporaries the size of the volume)."""
    out: Array = np.clip(hu, low, high, dtype=np.float32)
    out -= np.float32(low)
    out /= np.float32(high - low)
    return out


def to_nifti(labels: Array, volume: Volume) -> bytes:
    """uint8 labels [z, y, x] on the input grid -> .nii.gz bytes with the input's affine."""
    import nibabel as nib

    _quiet_readers()
    # [x, y, z] as a view: NIfTI stores Fortran order, which the view already is, so nibabel writes it without a copy
    image = nib.Nifti1Image(labels.astype(np.uint8, copy=False).transpose(2, 1, 0), volume.affine)
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)  # the same labels, the same bytes (no time stamp)
