"""Bad input to the /v1 endpoints: each case gets its 4xx with a message naming the problem, and nothing else is disturbed."""

from __future__ import annotations

import gzip
import io
import math
import os
import signal
import struct
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import pytest

from migserve.contract import read_contract
from service.families import lns
from service.families.volume import read_volume
from tests.helpers import ExportedRepo, Gateway
from tests.integration.test_family_endpoints import ASTRONAUT, NIBABEL_DATA, encode, lfw_faces, nifti_gz, npy, pydicom_file

MB = 1 << 20
JPEG = encode(ASTRONAUT)
PNG = lfw_faces(1)[0]
ANATOMICAL = (NIBABEL_DATA / "anatomical.nii").read_bytes()
CT_SMALL = pydicom_file("CT_small.dcm").read_bytes()
MR_TRUNCATED = pydicom_file("MR_truncated.dcm").read_bytes()
FEATURES = npy(np.random.default_rng(0).standard_normal((40, 1024)).astype(np.float32))


def _zip(name: str, data: bytes, compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


def _encrypted(archive: bytes) -> bytes:
    """The archive with its one member's encryption flag set, in its local header and in the directory."""
    flagged = bytearray(archive)
    flagged[6] |= 1
    flagged[archive.rfind(b"PK\x01\x02") + 8] |= 1
    return bytes(flagged)


def _compressed_with_method(archive: bytes, method: int) -> bytes:
    """The archive with its one member's compression method changed, in its local header and in the directory."""
    changed = bytearray(archive)
    changed[8:10] = method.to_bytes(2, "little")
    directory = archive.rfind(b"PK\x01\x02")
    changed[directory + 10 : directory + 12] = method.to_bytes(2, "little")
    return bytes(changed)


def _bad_png_crc() -> bytes:
    data = bytearray(PNG)
    data[40] ^= 0xFF  # inside IHDR/IDAT: the chunk checksum no longer matches
    return bytes(data)


def _corrupt_jpeg_header() -> bytes:
    data = bytearray(JPEG)
    data[4:400] = b"\x00" * 396  # after the first marker: tables and frame header gone
    return bytes(data)


def _bad_nifti_header() -> bytes:
    data = bytearray(ANATOMICAL)
    data[40:56] = b"\xff" * 16  # dim[]: nonsense dimensions
    return bytes(data)


def _damaged(data: bytes, at: int) -> bytes:
    damaged = bytearray(data)
    damaged[at] ^= 0xFF
    return bytes(damaged)


def _nifti_claiming(size: int) -> bytes:
    data = bytearray(ANATOMICAL)
    order = ">" if int.from_bytes(data[:4], "big") == 348 else "<"  # this one is big-endian
    data[42:48] = struct.pack(f"{order}3h", size, size, size)  # dim[1..3], with the data of the small volume after them
    return bytes(data)


def _nifti_with(at: int, field: bytes) -> bytes:
    """The NIfTI with one header field's bytes replaced (big-endian numbers: this file is)."""
    data = bytearray(ANATOMICAL)
    data[at : at + len(field)] = field
    return bytes(data)


def _nifti_whose_sform_row_y_is(row: tuple[float, float, float, float]) -> bytes:
    """A 16x16x8 NIfTI of 2 mm voxels whose sform's second row is `row` (written into the header's srow_y)."""
    image = nib.Nifti1Image(np.zeros((16, 16, 8), np.int16), np.diag([2.0, 2.0, 2.0, 1.0]))
    image.header.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    data = bytearray(image.to_bytes())
    data[296:312] = struct.pack("<4f", *row)  # srow_y, little-endian as nibabel wrote it here
    return bytes(data)


def _npy_claiming(rows: int) -> bytes:
    """A .npy header alone, saying [rows, 1024] float32 follow."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, 1024), }}".encode().ljust(117) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


Post = Callable[[httpx.Client], httpx.Response]


def image(path: str, data: bytes, **fields: str) -> Post:
    return lambda c: c.post(path, files={"image": ("upload", data)}, data=fields)


def grounding(features: bytes = FEATURES, **fields: str) -> Post:
    fields = {"sentence": "person opens a door", "duration": "12.5"} | fields
    return lambda c: c.post("/v1/grounding", files={"features": ("f.npy", features)}, data=fields)


def volume(data: bytes) -> Post:
    return lambda c: c.post("/v1/lns/segment", files={"volume": ("upload", data)})


def _form_broken_at_its_boundary() -> Post:
    request = httpx.Request("POST", "http://gateway/v1/crowd/count", files={"image": ("face.png", PNG, "image/png")})
    body, content_type = request.read(), request.headers["content-type"]
    return lambda c: c.post("/v1/crowd/count", content=body.replace(b"--", b"-x", 1), headers={"content-type": content_type})


# Damaged in ways nibabel, pydicom and python-multipart also logged (at ERROR, and as warnings), besides the 4xx
LOGGED_BY_LIBRARIES: dict[str, tuple[Post, int, str]] = {
    # the parser's words, where the client was told "Invalid multipart data." and the log got them
    "multipart broken at its boundary": (_form_broken_at_its_boundary(), 400, "Expected boundary character 45, got 120 at index 3"),
    "nifti of an unknown datatype code": (volume(_nifti_with(70, struct.pack(">h", 28164))), 422, "data code 28164 not recognized"),
    "nifti with a damaged magic string": (volume(_nifti_with(344, b"n+1\xed")), 422, "magic string"),
    "dicom with a damaged transfer syntax UID": (
        volume(CT_SMALL.replace(b"1.2.840.10008.1.2.1", b"1.2.\x9b40.10008.1.2.1", 1)),
        422,
        "'Transfer Syntax UID' value of '1.2.\x9b40.10008.1.2.1' is not supported",
    ),
}


CASES: dict[str, tuple[Post, int, str]] = {
    "gif image": (image("/v1/face/analyze", b"GIF89a\x01\x00\x01\x00"), 415, "not a JPEG or PNG"),
    "text body": (lambda c: c.post("/v1/crowd/count", content=b"hello", headers={"content-type": "text/plain"}), 415, "content type"),
    "empty upload": (image("/v1/crowd/count", b""), 422, "empty"),
    "truncated jpeg": (image("/v1/face/analyze", JPEG[: len(JPEG) // 3]), 422, "truncated"),
    "corrupt jpeg header": (image("/v1/crowd/count", _corrupt_jpeg_header()), 422, "corrupt JPEG"),
    "png with a bad checksum": (image("/v1/frontalize", _bad_png_crc()), 422, "corrupt PNG"),
    "no file": (lambda c: c.post("/v1/face/analyze", data={"detect": "false"}), 415, "multipart"),
    "file missing from form": (lambda c: c.post("/v1/face/analyze", files={"other": ("x", PNG)}), 422, "'other'"),
    "bad option": (image("/v1/face/analyze", PNG, max_faces="lots"), 422, "max_faces"),
    "unknown option": (image("/v1/crowd/count", PNG, densty="true"), 422, "densty"),
    "malformed json": (lambda c: c.post("/v1/face/analyze", content=b"{oops", headers={"content-type": "application/json"}), 400, "JSON"),
    "bad base64": (lambda c: c.post("/v1/face/analyze", json={"image": "***"}), 422, "base64"),
    "a number for the image": (lambda c: c.post("/v1/crowd/count", json={"image": 5}), 422, "must be the file as base64 text, not int 5"),
    "features with wrong D": (grounding(npy(np.zeros((10, 500), np.float32))), 422, "D is 500"),
    "zero-length features": (grounding(npy(np.zeros((0, 1024), np.float32))), 422, "zero frames"),
    "features of one dim": (grounding(npy(np.zeros(1024, np.float32))), 422, "expected shape"),
    "features with NaN": (grounding(npy(np.full((9, 1024), np.nan, np.float32))), 422, "NaN"),
    "not an npy file": (grounding(b"\x93NUMPY garbage"), 422, ".npy"),
    "npy header cut short": (grounding(FEATURES.replace(b"}", b" ", 1)), 422, "not a readable .npy array (TokenError"),
    "duration not positive": (grounding(duration="0"), 422, "duration"),
    "duration not a number": (grounding(duration="long"), 422, "duration"),
    "duration infinite": (grounding(duration="inf"), 422, "finite number"),
    "empty sentence": (grounding(sentence=""), 422, "sentence"),
    "sentence without words": (grounding(sentence="?! ..."), 422, "no words"),
    "unknown variant": (grounding(variant="bert"), 422, "variant 'bert'"),
    "top_k zero": (grounding(top_k="0"), 422, "top_k"),
    "bad nifti header": (volume(_bad_nifti_header()), 422, "3D"),
    "truncated nifti": (volume(ANATOMICAL[: len(ANATOMICAL) // 2]), 422, "bad NIfTI"),
    "truncated nifti.gz": (volume(gzip.compress(ANATOMICAL)[:5000]), 422, "gzip"),
    "4D nifti": (volume((NIBABEL_DATA / "example4d.nii.gz").read_bytes()), 422, "3D CT volume"),
    "truncated dicom": (volume(_zip("a.dcm", MR_TRUNCATED)), 422, "broken DICOM"),
    "dicom without pixels": (volume(_zip("a.dcm", CT_SMALL[:4000])), 422, "a.dcm"),
    "zip of non-dicom": (volume(_zip("notes.txt", b"hello")), 422, "not a DICOM file"),
    "broken zip": (volume(_zip("a.dcm", CT_SMALL)[:3000]), 422, "broken zip"),
    # zlib's errors, a name's decoding and an encrypted member were not among those caught, and answered 500
    "nifti.gz with a damaged deflate stream": (
        volume(_damaged(gzip.compress(ANATOMICAL, mtime=0), 20)),
        422,
        "corrupt gzip data (Error -3",
    ),
    "zip with a damaged deflate stream": (
        volume(_damaged(_zip("a.dcm", CT_SMALL, zipfile.ZIP_DEFLATED), 35)),
        422,
        "broken zip file (Error -3",
    ),
    "zip member name not UTF-8": (
        volume(_zip("a\xe9.dcm", CT_SMALL).replace(b"a\xc3\xa9", b"a\xc3\xff")),
        422,
        "broken zip file ('utf-8' codec",
    ),
    "encrypted zip member": (volume(_encrypted(_zip("a.dcm", CT_SMALL))), 422, "is encrypted, password required"),
    # Deflate64 (method 9), which zipfile cannot read: its NotImplementedError answered 500
    "zip member in Deflate64": (
        volume(_compressed_with_method(_zip("a.dcm", CT_SMALL), 9)),
        422,
        "broken zip file (That compression method is not supported)",
    ),
    "not a volume": (volume(JPEG), 415, "not NIfTI"),
    # a 20 KB upload whose voxels claim to be a kilometre wide: resampled to the model's spacing, 5e20 voxels
    # (before: the gateway grew to 24 GB resampling it and the kernel killed it)
    "voxels a kilometre wide": (
        volume(nifti_gz(np.zeros((40, 40, 20), np.int16), np.diag([1e6, 1e6, 1e6, 1.0]))),
        413,
        "resampled to the model's [4.0, 4.0, 4.0] mm, make 500000000000000000000 voxels, over the limit of 64000000",
    ),
    # segmented whole, then the label map could not be written with the input's affine: 500 after the work
    "nifti whose affine holds NaN": (volume(_nifti_whose_sform_row_y_is((0.0, 2.0, math.nan, 0.0))), 422, "affine from its header's sform"),
    "nifti whose affine is flat": (
        volume(_nifti_whose_sform_row_y_is((0.0, 0.0, 0.0, 0.0))),
        422,
        "is not usable: [[2.0, 0.0, 0.0, 0.0], [0.0, 0.0",
    ),
    "complex voxels": (volume(nifti_gz(np.zeros((8, 8, 8), np.complex64), np.eye(4))), 422, "NIfTI voxels of type complex64"),
    "a nifti header of 30000^3 voxels": (volume(_nifti_claiming(30000)), 413, "the NIfTI header gives shape [30000, 30000, 30000]"),
    "an npy header of 10^14 values": (
        grounding(_npy_claiming(10**11)),
        422,
        "its header gives shape [100000000000, 1024] of float32, 409600000000000 bytes, but 0 follow it",
    ),
    **LOGGED_BY_LIBRARIES,
}


@pytest.fixture(scope="module")
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://{gateway.url}", timeout=60) as client:
        yield client


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_its_4xx_and_a_message(http: httpx.Client, case: str) -> None:
    post, status, fragment = CASES[case]
    response = post(http)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]


def test_bad_input_disturbs_nothing_else(http: httpx.Client) -> None:
    """Every bad case at once, interleaved with good requests: the good ones all succeed."""
    good: list[Post] = [image("/v1/crowd/count", PNG), grounding(), image("/v1/face/analyze", PNG, detect="false")] * 4
    posts = [p for p, _, _ in CASES.values()] + good
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda p: p(http), posts))
    assert all(r.status_code == 200 for r in responses[len(CASES) :])
    assert all(400 <= r.status_code < 500 for r in responses[: len(CASES)])
    assert http.get("/v2/health/ready").status_code == 200


def test_a_damaged_upload_is_the_client_s_4xx_and_not_the_gateway_s_logged_error(http: httpx.Client, gateway: Gateway) -> None:
    """What was wrong goes to the client; the operator's log gets nothing of it (before: nibabel's ERROR lines, twice,
    and pydicom's warnings, for every such upload)."""
    before = gateway.log.stat().st_size
    for post, status, fragment in LOGGED_BY_LIBRARIES.values():
        response = post(http)
        assert response.status_code == status and fragment in response.json()["error"], response.text
    tolerated = CT_SMALL.replace(b"ISO_IR 100", b"IS_IR 100 ", 1)  # an unknown character set: read with the default
    assert volume(tolerated)(http).status_code == 200
    logged = gateway.log.read_bytes()[before:].decode(errors="replace")
    for said in ("not recognized", "magic string", "Invalid value for VR", "nibabel", "pydicom", "boundary", "multipart", "encoding"):
        assert said not in logged, logged


@pytest.fixture(scope="module")
def limited(tiny_repo: ExportedRepo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A gateway with small limits: 1 MiB bodies, 3 MiB of bodies held at once, 0.1 MP images, 0.5 M voxels, 100 KiB
    of finished jobs' results, one CT job at a time, two of its tiles outstanding, JSON bodies of 0.5 MiB."""
    log = tmp_path_factory.mktemp("limited") / "serve.log"
    args = ("--cpu-slices", "1", "--models", "crowd-csrnet", "lns-organs", "lns-stations", "grounding-dscnet")
    limits = ["--max-body-mb", "1", "--max-pending-mb", "3", "--max-image-mp", "0.1", "--max-volume-mvox", "0.5", "--job-results-mb", "0.1"]
    limits += ["--max-jobs", "1", "--tiles-in-flight", "2", "--max-json-mb", "0.5"]
    server = Gateway(tiny_repo.root, *args, *limits, log=log)
    with httpx.Client(base_url=f"http://{server.url}", timeout=60) as client:
        yield client
    server.close()


def test_over_the_limits_answers_413(limited: httpx.Client) -> None:
    big = np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    too_big = limited.post("/v1/crowd/count", files={"image": ("big.png", encode(big, "PNG"))})
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]
    many_pixels = limited.post("/v1/crowd/count", files={"image": ("a.jpg", JPEG)})  # 0.26 MP in a small JPEG
    assert many_pixels.status_code == 413 and "pixels" in many_pixels.json()["error"]
    many_voxels = volume(nifti_gz(np.zeros((100, 100, 60), np.int16), np.eye(4)))(limited)
    assert many_voxels.status_code == 413 and "voxels" in many_voxels.json()["error"]
    streamed = limited.post(
        "/v1/crowd/count", content=iter([b"\x89PNG\r\n\x1a\n", b"\x00" * (2 << 20)]), headers={"content-type": "image/png"}
    )
    assert streamed.status_code == 413
    assert limited.post("/v1/crowd/count", files={"image": ("face.png", PNG)}).status_code == 200


def test_what_a_volume_unpacks_to_is_held_within_the_pending_budget(limited: httpx.Client) -> None:
    """A gzipped or zipped volume of a few KB may unpack to 4x --max-body-mb; what it unpacks to is counted with the
    bodies the gateway holds (--max-pending-mb, 3 MiB here), so a handful of them at once cannot take its memory."""
    ct = np.zeros((80, 80, 70))  # float64: 3.6 MB unpacked, within the 4 MiB a volume may unpack to; 0.45 M voxels
    packed = {"gzip": ("ct.nii.gz", nifti_gz(ct, np.eye(4))), "zip": ("series.zip", _zip("a.dcm", b"\0" * 3_500_000, zipfile.ZIP_DEFLATED))}
    for kind, (name, data) in packed.items():
        assert len(data) < 100_000, kind
        answer = limited.post("/v1/lns/segment", files={"volume": (name, data)}, data={"mode": "sync"})
        assert answer.status_code == 503 and "--max-pending-mb 3" in answer.json()["error"], (kind, answer.text)
        assert answer.headers["retry-after"] == "1"
    held = [line for line in limited.get("/metrics").text.splitlines() if line.startswith("migserve_request_body_bytes ")]
    assert held == ["migserve_request_body_bytes 0.0"], "what the refused volumes unpacked was given back"
    small = nifti_gz(np.zeros((40, 40, 20), np.int16), np.diag([4.0, 4.0, 4.0, 1.0]))
    assert limited.post("/v1/lns/segment", files={"volume": ("ct.nii.gz", small)}, data={"mode": "sync"}).status_code == 200


def test_what_an_image_decodes_to_is_held_within_the_pending_budget(limited: httpx.Client) -> None:
    """A JPEG or PNG of a few KB may decode to --max-image-mp; what the endpoint holds for its pixels (32 bytes a pixel
    for crowd counting: service/api/v1.py, measured by bench/image_memory.py) is counted with the bodies from the image's
    header on, so a handful of large images at once cannot take the gateway's memory: here 0.1 MP is 3.2 MB, over
    --max-pending-mb 3 alone."""
    flat = encode(np.full((316, 316, 3), 90, np.uint8), "PNG")  # 99,856 pixels, within --max-image-mp 0.1
    assert len(flat) < 10_000
    refused = limited.post("/v1/crowd/count", files={"image": ("flat.png", flat)})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
    assert "3.0 MB more would pass --max-pending-mb 3" in refused.json()["error"], refused.text
    held = [line for line in limited.get("/metrics").text.splitlines() if line.startswith("migserve_request_body_bytes ")]
    assert held == ["migserve_request_body_bytes 0.0"], "what the refused image was counted for was given back"
    answer = limited.post("/v1/crowd/count", files={"image": ("face.png", PNG)})  # 250x250: 2 MB
    assert answer.status_code == 200, answer.text


def test_json_bodies_are_bounded_and_what_they_parse_to_is_held_within_the_pending_budget(limited: httpx.Client) -> None:
    """A JSON body is parsed whole in the event loop into Python objects up to 24 times its size: past --max-json-mb
    (0.5 here) it is 413 asking for the file another way, and below it that much is counted with the bodies (503 past
    --max-pending-mb 3: 160 KB of features in JSON is 3.9 MB), while a smaller one is served."""
    sentence = {"sentence": "a person sits", "duration": 2.0, "variant": "dscnet"}
    big = limited.post("/v1/grounding", json={"features": np.full((150, 1024), 0.5).tolist()} | sentence)
    assert big.status_code == 413, big.text
    assert "is over --max-json-mb 0.5: send the features as a multipart part" in big.json()["error"]
    refused = limited.post("/v1/grounding", json={"features": np.full((40, 1024), 0.5).tolist()} | sentence)
    assert refused.status_code == 503 and "more would pass --max-pending-mb 3" in refused.json()["error"], refused.text
    held = [line for line in limited.get("/metrics").text.splitlines() if line.startswith("migserve_request_body_bytes ")]
    assert held == ["migserve_request_body_bytes 0.0"], "what the refused body was counted for was given back"
    served = limited.post("/v1/grounding", json={"features": np.full((8, 1024), 0.5).tolist()} | sentence)
    assert served.status_code == 200, served.text


def test_ct_jobs_and_their_tiles_in_flight_are_bounded(limited: httpx.Client) -> None:
    """--max-jobs 1: while a CT job runs (its worker stopped) another is answered 503; --tiles-in-flight 2: the job
    never has more than two tiles out, so no batch of them has more than two rows once the worker goes on."""
    ct = nifti_gz(np.random.default_rng(5).normal(-300, 400, (80, 80, 40)).astype(np.int16), np.diag([4.0, 4.0, 4.0, 1.0]))
    (worker,) = limited.get("/v1/partitions").json()["partitions"]
    os.kill(worker["pid"], signal.SIGSTOP)
    try:
        first = limited.post("/v1/lns/segment", files={"volume": ("ct.nii.gz", ct)}, data={"mode": "job"})
        assert first.status_code == 202, first.text
        second = limited.post("/v1/lns/segment", files={"volume": ("ct.nii.gz", ct)}, data={"mode": "job"})
        assert second.status_code == 503 and "1 jobs are already running" in second.json()["error"], second.text
    finally:
        os.kill(worker["pid"], signal.SIGCONT)
    _no_batch_over_two_rows(_done(limited, first.json()))


def test_ct_jobs_hold_their_memory_within_max_job_mb(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """--max-job-mb bounds what running CT jobs hold by their estimates (service/families/lns.py job_bytes): here it
    has room for a 80x80x40 volume's job with 2 of its --tiles-in-flight 8, which it then runs with 2 (the log says
    so; no batch has more rows); while it runs, /metrics shows what it holds and the same volume again is 503; a
    volume whose job could not fit alone is 413."""
    ct = nifti_gz(np.random.default_rng(5).normal(-300, 400, (80, 80, 40)).astype(np.int16), np.diag([4.0, 4.0, 4.0, 1.0]))
    big = nifti_gz(np.zeros((100, 100, 40), np.int16), np.diag([4.0, 4.0, 4.0, 1.0]))
    organs, stations = (read_contract(tiny_repo.root / name) for name in ("lns-organs", "lns-stations"))

    def needs(data: bytes, in_flight: int) -> int:
        volume = read_volume(data, max_bytes=1 << 30, max_voxels=1 << 30)
        shape = (volume.hu.shape[0], volume.hu.shape[1], volume.hu.shape[2])
        return lns.job_bytes(shape, lns.plan(volume, organs, stations, 1 << 30)[0], organs, stations, in_flight)

    assert needs(ct, 2) < needs(ct, 3) and needs(big, 1) > needs(ct, 3), "the test's premise"
    budget_mb = (needs(ct, 2) + needs(ct, 3)) / 2 / MB
    args = ("--cpu-slices", "1", "--models", "lns-organs", "lns-stations", "--tiles-in-flight", "8", "--max-jobs", "2")
    server = Gateway(tiny_repo.root, *args, "--max-job-mb", f"{budget_mb:.3f}", log=tmp_path / "serve.log")
    try:
        with httpx.Client(base_url=f"http://{server.url}", timeout=60) as client:
            alone = client.post("/v1/lns/segment", files={"volume": ("big.nii.gz", big)}, data={"mode": "job"})
            assert alone.status_code == 413, alone.text
            assert f"would hold about {needs(big, 1) / MB:.0f} MB of the gateway's memory, over --max-job-mb" in alone.json()["error"]
            (worker,) = client.get("/v1/partitions").json()["partitions"]
            os.kill(worker["pid"], signal.SIGSTOP)
            try:
                first = client.post("/v1/lns/segment", files={"volume": ("ct.nii.gz", ct)}, data={"mode": "job"})
                assert first.status_code == 202, first.text
                assert _summed(client.get("/metrics").text.splitlines(), "migserve_job_bytes ") == needs(ct, 2)
                again = client.post("/v1/lns/segment", files={"volume": ("ct.nii.gz", ct)}, data={"mode": "job"})
                assert again.status_code == 503 and again.headers["retry-after"] == "5", again.text
                assert f"the running jobs hold about {needs(ct, 2) / MB:.0f} MB; this lns-segment job's" in again.json()["error"]
            finally:
                os.kill(worker["pid"], signal.SIGCONT)
            metrics = _done(client, first.json())
            assert _summed(metrics, "migserve_job_bytes ") == 0
            _no_batch_over_two_rows(metrics)
    finally:
        server.close()
    fewer = f"runs 2 tiles at once, not --tiles-in-flight 8: the running CT jobs would pass --max-job-mb {budget_mb:.3f}"
    assert fewer in server.log.read_text()


def _done(client: httpx.Client, job: dict[str, Any]) -> list[str]:
    """/metrics' lines once `job` (its status) is done."""
    deadline = time.monotonic() + 60
    while job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
        job = client.get(job["status_url"]).json()
    assert job["state"] == "done", job
    return client.get("/metrics").text.splitlines()


def _no_batch_over_two_rows(metrics: list[str]) -> None:
    for model in ("lns-organs", "lns-stations"):
        batches = _summed(metrics, "migserve_batch_size_count{", f'model="{model}"')
        assert batches > 1 and _summed(metrics, "migserve_batch_size_bucket{", f'model="{model}"', 'le="2.0"') == batches, model


def _summed(metrics: list[str], start: str, *labels: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics if line.startswith(start) and all(label in line for label in labels))


def test_other_models_are_not_found(limited: httpx.Client) -> None:
    response = limited.post("/v1/face/analyze", files={"image": ("face.png", PNG)})
    assert response.status_code == 404 and "no face model" in response.json()["error"]
    assert limited.get("/v1/jobs/0123").status_code == 404


def test_finished_results_are_bounded_the_oldest_dropped_first(limited: httpx.Client) -> None:
    """Every /v1/lns/segment keeps its label map for GET /v1/jobs/ID/labels.nii.gz; under a steady stream of requests
    those results would grow the gateway for the whole --job-ttl. Past --job-results-mb the oldest are dropped."""
    rng = np.random.default_rng(7)
    urls, sizes = [], []
    for _ in range(4):  # each label map about 50 KB compressed: the budget holds one
        ct = nifti_gz(rng.normal(-300, 400, (80, 80, 40)).astype(np.int16), np.diag([4.0, 4.0, 4.0, 1.0]))
        answer = limited.post("/v1/lns/segment", files={"volume": ("ct.nii.gz", ct)}, data={"mode": "sync"})
        assert answer.status_code == 200, answer.text
        urls.append(answer.json()["label_map_url"])
        sizes.append(len(limited.get(urls[-1]).content))
    assert all(40_000 < size < 100_000 for size in sizes), sizes  # the test's premise: two cannot both be kept
    first = limited.get(urls[0])
    assert first.status_code == 404
    assert "finished, and its result was dropped to keep finished results under 0.1 MB" in first.json()["error"]
    assert limited.get(urls[-1]).status_code == 200  # the newest is kept
