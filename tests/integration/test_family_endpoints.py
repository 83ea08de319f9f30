"""The /v1 family endpoints end to end: real files in, well-formed answers out, through `migserve serve`.

Files are real: skimage's astronaut (a real face) and LFW crops, pydicom's
CT_small.dcm, nibabel's test NIfTI volumes, Charades-STA queries from shared/.
"""

from __future__ import annotations

import base64
import gzip
import io
import itertools
import json
import math
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import pydicom.data
import pytest
import skimage.data
from nibabel.testing import data_path
from PIL import Image

from migserve.contract import read_contract
from migserve.types import Array
from tests.helpers import ExportedRepo, Gateway

ASTRONAUT = skimage.data.astronaut()  # 512x512 RGB, one face
NIBABEL_DATA = Path(str(data_path))


def pydicom_file(name: str) -> Path:
    return Path(str(pydicom.data.get_testdata_file(name)))


CT_SMALL = pydicom_file("CT_small.dcm")


def encode(pixels: Array, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def lfw_faces(count: int) -> list[bytes]:
    faces = skimage.data.lfw_subset()[:count]  # the first 100 are faces, 25x25 grey in [0, 1]
    return [encode((f * 255).astype(np.uint8), "PNG") for f in faces]


def npy(array: Array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def dicom_zip(*members: tuple[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def nifti_gz(volume: Array, affine: Array) -> bytes:
    return gzip.compress(nib.Nifti1Image(volume, affine).to_bytes())


@pytest.fixture(scope="module")
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://{gateway.url}", timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def charades(shared: Path) -> list[tuple[str, float]]:
    """(sentence, video duration) for the first 12 test queries."""
    annotations = json.loads((shared / "data" / "charades_sta_test.json").read_text())
    pairs = ((s, v["video_duration"]) for v in annotations.values() for s in v["sentences"])
    return list(itertools.islice(pairs, 12))


# --- face --------------------------------------------------------------------------------


def _inside(points: list[list[float]], width: int, height: int) -> bool:
    return all(0 <= x <= width and 0 <= y <= height for x, y in points)


def test_face_analyze_finds_the_astronauts_face(http: httpx.Client, tiny_repo: ExportedRepo) -> None:
    contract = read_contract(tiny_repo.root / "face-pros")
    post = contract.postprocessing
    response = http.post(
        "/v1/face/analyze", files={"image": ("astronaut.jpg", encode(ASTRONAUT), "image/jpeg")}, data={"embedding": "true"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image"] == {"width": 512, "height": 512} and body["detected"] and body["weights"] == "random-init"
    assert len(body["faces"]) >= 1
    face = body["faces"][0]
    x, y, w, h = face["box"]
    assert x >= 0 and y >= 0 and x + w <= 512 and y + h <= 512 and 40 < w < 300
    assert 150 < x + w / 2 < 300 and 50 < y + h / 2 < 200, "the face is in the upper middle of the picture"
    assert list(face["attributes"]) == list(post.attribute_names)  # type: ignore[union-attr]
    assert all(0 <= p <= 1 for p in face["attributes"].values())
    expression = face["expression"]
    assert list(expression["probabilities"]) == list(post.expression_labels)  # type: ignore[union-attr]
    assert math.isclose(sum(expression["probabilities"].values()), 1.0, abs_tol=1e-3)
    assert expression["label"] == max(expression["probabilities"], key=expression["probabilities"].get)
    assert len(face["landmarks"]) == 68 and _inside(face["landmarks"], 512, 512)
    cx, cy, cw, ch = face["crop"]
    assert _inside(face["landmarks"], cx + cw, cy + ch) and all(px >= cx and py >= cy for px, py in face["landmarks"])
    assert len(face["embedding"]) == contract.output("embedding").shape[1]


def test_face_without_detection_as_json_and_as_a_raw_body(http: httpx.Client) -> None:
    first, second = lfw_faces(2)
    as_json = http.post("/v1/face/analyze", json={"image": base64.b64encode(first).decode(), "detect": False})
    raw = http.post("/v1/face/analyze?detect=false", content=second, headers={"content-type": "image/png"})
    for response in (as_json, raw):
        assert response.status_code == 200, response.text
        faces = response.json()["faces"]
        assert len(faces) == 1 and faces[0]["crop"] == [0, 0, 25, 25] and faces[0]["embedding"] is None
        assert _inside(faces[0]["landmarks"], 25, 25)
    assert as_json.json()["faces"][0]["attributes"] != raw.json()["faces"][0]["attributes"], "two different faces"


def test_a_photo_without_faces_answers_no_faces(http: httpx.Client) -> None:
    sky = np.zeros((240, 320, 3), dtype=np.uint8)
    sky[..., 2] = 200
    response = http.post("/v1/face/analyze", files={"image": ("sky.png", encode(sky, "PNG"), "image/png")})
    assert response.status_code == 200 and response.json()["faces"] == []


# --- frontalize --------------------------------------------------------------------------


def test_frontalize_returns_a_png_or_json(http: httpx.Client, tiny_repo: ExportedRepo) -> None:
    size = read_contract(tiny_repo.root / "frontalize-dalgan").output("visible").shape[2]
    thermal = lfw_faces(1)[0]
    png = http.post("/v1/frontalize", files={"image": ("thermal.png", thermal, "image/png")})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (size, size)
    as_json = http.post("/v1/frontalize", files={"image": ("thermal.png", thermal, "image/png")}, data={"format": "json"})
    assert as_json.status_code == 200
    assert base64.b64decode(as_json.json()["png"]) == png.content, "same input, same answer"


# --- grounding ---------------------------------------------------------------------------

VARIANTS = ("mgsl", "ssrn", "ecrl", "dscnet", "mhst")


def _iou(a: dict[str, float], b: dict[str, float]) -> float:
    inter = max(0.0, min(a["end"], b["end"]) - max(a["start"], b["start"]))
    return inter / (max(a["end"], b["end"]) - min(a["start"], b["start"]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_grounding_moments_lie_in_the_video_ranked_and_suppressed(
    http: httpx.Client, tiny_repo: ExportedRepo, charades: list[tuple[str, float]], variant: str
) -> None:
    contract = read_contract(tiny_repo.root / f"grounding-{variant}")
    rng = np.random.default_rng(1)
    for i, (sentence, duration) in enumerate(charades[:4]):
        frames = max(1, round(duration * 16 / 8))  # one feature per 8 frames decoded at 16 fps
        features = rng.standard_normal((frames, int(contract.input("video").shape[2]))).astype(np.float32)
        fields = {"sentence": sentence, "duration": str(duration), "variant": variant, "top_k": str(3 + i)}
        response = http.post("/v1/grounding", files={"features": ("f.npy", npy(features))}, data=fields)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == f"grounding-{variant}" and body["frames"] == min(frames, 512)
        moments = body["moments"]
        assert 1 <= len(moments) <= 3 + i
        assert all(0 <= m["start"] < m["end"] <= duration for m in moments)
        assert [m["score"] for m in moments] == sorted((m["score"] for m in moments), reverse=True)
        nms = contract.postprocessing.nms_iou  # type: ignore[union-attr]
        assert all(_iou(a, b) < nms + 1e-3 for a, b in itertools.combinations(moments, 2))


def test_grounding_unknown_words_long_videos_and_json_features(http: httpx.Client) -> None:
    rng = np.random.default_rng(2)
    long = rng.standard_normal((700, 1024)).astype(np.float32)
    fields = {"sentence": "Person flibbertigibbets the blorf, then opens a door.", "duration": "233.5"}
    response = http.post("/v1/grounding", files={"features": ("long.npy", npy(long))}, data=fields)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["unknown_words"] == ["flibbertigibbets", "blorf"] and body["words"][0] == "person"
    assert body["frames"] == 512, "pooled to the contract's max_frames"
    assert all(0 <= m["start"] < m["end"] <= 233.5 for m in body["moments"])
    short = rng.standard_normal((3, 1024)).round(3).tolist()  # fewer frames than the model's minimum: padded and masked
    response = http.post("/v1/grounding", json={"features": short, "sentence": "a person sits", "duration": 2.0, "variant": "dscnet"})
    assert response.status_code == 200, response.text
    assert response.json()["frames"] == 3 and all(0 <= m["start"] < m["end"] <= 2.0 for m in response.json()["moments"])


# --- lymph node stations -------------------------------------------------------------------


def _label_map(http: httpx.Client, url: str) -> nib.Nifti1Image:
    response = http.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "application/gzip"
    return nib.Nifti1Image.from_bytes(gzip.decompress(response.content))


def _check_summary(summary: dict[str, Any], stations: tuple[str, ...], shape: tuple[int, ...], voxel_ml: float) -> None:
    assert list(summary["stations"]) == list(stations[1:])
    voxels = [s["voxels"] for s in summary["stations"].values()]
    assert all(v >= 0 for v in voxels) and sum(voxels) <= math.prod(shape)
    for s in summary["stations"].values():
        assert math.isclose(s["volume_ml"], s["voxels"] * voxel_ml, rel_tol=1e-3, abs_tol=1e-3)


def test_lns_segments_a_nifti_volume_onto_its_own_grid(http: httpx.Client, tiny_repo: ExportedRepo) -> None:
    source = NIBABEL_DATA / "anatomical.nii"
    original = nib.Nifti1Image.from_bytes(source.read_bytes())
    response = http.post("/v1/lns/segment", files={"volume": ("anatomical.nii", source.read_bytes())}, data={"inline": "true"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["models"] == ["lns-organs", "lns-stations"] and body["summary"]["source"] == "nifti"
    assert body["summary"]["shape"] == list(original.shape)
    labels = _label_map(http, body["label_map_url"])
    assert labels.shape == original.shape and np.allclose(labels.affine, original.affine)
    assert gzip.decompress(base64.b64decode(body["label_map_base64"])) == gzip.decompress(http.get(body["label_map_url"]).content)
    stations = read_contract(tiny_repo.root / "lns-stations").postprocessing.labels  # type: ignore[union-attr]
    data = np.asarray(labels.dataobj)
    assert data.max() < len(stations)
    _check_summary(body["summary"], stations, original.shape, 2.0**3 / 1000)
    counts = np.bincount(data.ravel(), minlength=len(stations))
    assert [s["voxels"] for s in body["summary"]["stations"].values()] == counts[1:].tolist()


def test_lns_reads_a_zipped_dicom_series(http: httpx.Client) -> None:
    ds = pydicom.dcmread(CT_SMALL)
    archive = dicom_zip(("series/CT_small.dcm", CT_SMALL.read_bytes()))
    response = http.post("/v1/lns/segment", files={"volume": ("series.zip", archive, "application/zip")})
    assert response.status_code == 200, response.text
    summary = response.json()["summary"]
    assert summary["source"] == "dicom" and summary["shape"] == [ds.Columns, ds.Rows, 1]
    labels = _label_map(http, response.json()["label_map_url"])
    assert labels.shape == (ds.Columns, ds.Rows, 1)
    ras_origin = [-float(ds.ImagePositionPatient[0]), -float(ds.ImagePositionPatient[1]), float(ds.ImagePositionPatient[2])]
    assert np.allclose(labels.affine[:3, 3], ras_origin) and np.isclose(abs(labels.affine[0, 0]), float(ds.PixelSpacing[1]))


def test_a_large_volume_runs_as_a_job_with_progress_and_batched_tiles(http: httpx.Client) -> None:
    rng = np.random.default_rng(3)
    volume = rng.normal(-300, 400, (150, 150, 80)).astype(np.int16)
    affine = np.diag([1.5, 1.5, 2.5, 1.0])
    before = http.get("/metrics").text
    response = http.post("/v1/lns/segment", files={"volume": ("ct.nii.gz", nifti_gz(volume, affine))})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == job["status_url"] and job["state"] == "running"
    seen = [job["progress"]["done"]]
    deadline = time.monotonic() + 120
    while job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
        job = http.get(job["status_url"]).json()
        seen.append(job["progress"]["done"])
    assert job["state"] == "done", job
    assert seen == sorted(seen) and seen[-1] == job["progress"]["total"] > 32
    labels = _label_map(http, job["result"]["label_map_url"])
    assert labels.shape == volume.shape and np.allclose(labels.affine, affine)
    after = http.get("/metrics").text
    rows = _metric(after, "migserve_batch_size_sum", "lns-organs") - _metric(before, "migserve_batch_size_sum", "lns-organs")
    batches = _metric(after, "migserve_batch_size_count", "lns-organs") - _metric(before, "migserve_batch_size_count", "lns-organs")
    assert rows == job["progress"]["total"] // 2 and batches < rows, "tiles were batched"


def test_a_running_job_deleted_is_cancelled_and_its_url_says_so(http: httpx.Client) -> None:
    volume = np.random.default_rng(4).normal(-300, 400, (256, 256, 160)).astype(np.int16)  # 600 tiles: 4 s here
    before, cancelled = _tiles_run(http), _counted(http, "migserve_jobs_ended_total", 'outcome="cancelled"')
    response = http.post("/v1/lns/segment", files={"volume": ("ct.nii.gz", nifti_gz(volume, np.diag([1.5, 1.5, 2.5, 1.0])))})
    assert response.status_code == 202, response.text
    job = response.json()
    deleted = http.delete(job["status_url"])
    assert deleted.status_code == 204 and deleted.content == b""
    for url in (job["status_url"], job["status_url"] + "/labels.nii.gz"):
        gone = http.get(url)
        assert gone.status_code == 404 and f"job '{job['id']}' was deleted (DELETE /v1/jobs/{job['id']})" in gone.json()["error"]
    assert http.delete(job["status_url"]).status_code == 404
    gauges = dict(line.rsplit(" ", 1) for line in http.get("/metrics").text.splitlines() if line.startswith("migserve_job"))
    assert float(gauges["migserve_jobs_running"]) == 0 and float(gauges["migserve_job_bytes"]) == 0, "its memory given back"
    time.sleep(0.5)  # what was already in a worker
    run = _tiles_run(http)
    time.sleep(2)
    assert _tiles_run(http) == run and run - before < job["progress"]["total"], "its tiles left the queues, not all of them run"
    assert _counted(http, "migserve_jobs_ended_total", 'outcome="cancelled"') == cancelled + 1
    assert http.delete("/v1/jobs/nope").status_code == 404


def test_a_poll_may_wait_for_the_job_to_end(http: httpx.Client) -> None:
    """GET /v1/jobs/ID?wait_s=N answers as soon as the job ends (a long poll): one poll instead of many."""
    volume = np.random.default_rng(6).normal(-300, 400, (150, 150, 80)).astype(np.int16)
    response = http.post("/v1/lns/segment", files={"volume": ("ct.nii.gz", nifti_gz(volume, np.diag([1.5, 1.5, 2.5, 1.0])))})
    assert response.status_code == 202, response.text
    url = response.json()["status_url"]
    done = _counted(http, "migserve_jobs_ended_total", 'outcome="done"')
    seconds = _counted(http, "migserve_job_seconds_count", 'kind="lns-segment"')
    job = http.get(url, params={"wait_s": 60}, timeout=90).json()
    assert job["state"] == "done" and job["progress"]["done"] == job["progress"]["total"], job
    assert _counted(http, "migserve_jobs_ended_total", 'outcome="done"') == done + 1, "counted in /metrics, with its time"
    assert _counted(http, "migserve_job_seconds_count", 'kind="lns-segment"') == seconds + 1
    for wrong in ("-1", "61", "soon"):
        refused = http.get(url, params={"wait_s": wrong})
        assert refused.status_code == 422 and "wait_s" in refused.text, refused.text


def _counted(http: httpx.Client, name: str, label: str) -> float:
    """The sum of /metrics samples `name` whose labels include `label` (e.g. 'outcome="done"')."""
    lines = http.get("/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{") and label in line)


def _tiles_run(http: httpx.Client) -> float:
    """Rows the CT models have run, both stages."""
    metrics = http.get("/metrics").text
    return sum(_metric(metrics, "migserve_batch_size_sum", m) for m in ("lns-organs", "lns-stations"))


def _metric(text: str, name: str, model: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{") and f'model="{model}"' in line)


# --- crowd ---------------------------------------------------------------------------------


ND_IMAGE = "scipy/ndimage/_nd_image"  # the extension module scipy.ndimage maps, the last of the readers' imports


def readers_imported_within(pid: int, seconds: float) -> bool:
    """Whether process `pid` maps scipy.ndimage's extension within `seconds` (polled): the volume readers imported."""
    maps, until = Path(f"/proc/{pid}/maps"), time.monotonic() + seconds
    while ND_IMAGE not in maps.read_text() and time.monotonic() < until:
        time.sleep(0.1)
    return ND_IMAGE in maps.read_text()


@pytest.mark.parametrize(("models", "imports"), [(("lns-organs", "lns-stations"), True), (("crowd-csrnet",), False)])
def test_a_gateway_serving_a_ct_model_imports_the_volume_readers_as_it_starts(
    tiny_repo: ExportedRepo, tmp_path: Path, models: tuple[str, ...], imports: bool
) -> None:
    """Without waiting for a volume (whose request would pay for the import: 0.7 s where the next took 0.2), and only
    where a CT model is served. Read from the gateway process's mappings, before any request."""
    gateway = Gateway(tiny_repo.root, "--models", *models, log=tmp_path / "gateway.log")
    try:
        imported = readers_imported_within(gateway.process.pid, 30 if imports else 2)  # False: mapped within 2 s is wrong
        assert imported is imports, f"{models}: scipy.ndimage {'not ' if imports else ''}imported"
    finally:
        gateway.close()


def test_crowd_count_and_heatmap(http: httpx.Client) -> None:
    response = http.post("/v1/crowd/count", files={"image": ("a.jpg", encode(ASTRONAUT))}, data={"density": "true"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["count"] >= 0 and body["tiles"] == 1 and body["density_shape"] == [64, 64]
    heatmap = Image.open(io.BytesIO(base64.b64decode(body["density_png"])))
    assert heatmap.format == "PNG" and heatmap.size == (512, 512)
    assert http.post("/v1/crowd/count", files={"image": ("a.jpg", encode(ASTRONAUT))}).json()["density_png"] is None


def test_crowd_images_of_any_size(http: httpx.Client) -> None:
    wide = np.tile(ASTRONAUT, (3, 5, 1))[:1500, :2501]  # over the contract's 1024: tiled
    tiny = ASTRONAUT[:5, :7]  # under the minimum and not a multiple of 8: padded
    before = _crowd_statistics(http)
    for pixels, tiles in ((wide, 6), (tiny, 1)):
        response = http.post("/v1/crowd/count", content=encode(pixels, "PNG"), headers={"content-type": "image/png"})
        assert response.status_code == 200, response.text
        body = response.json()
        height, width = pixels.shape[:2]
        assert body["tiles"] == tiles and body["density_shape"] == [math.ceil(height / 8), math.ceil(width / 8)] and body["count"] >= 0
    after = _crowd_statistics(http)
    # Triton's statistics count the endpoint's tiles: 7 rows, each chunk of them one request, queued once and answered.
    assert after["inference_count"] - before["inference_count"] == 7
    answered = after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
    assert answered >= 2 and answered == after["inference_stats"]["queue"]["count"] - before["inference_stats"]["queue"]["count"]


def _crowd_statistics(http: httpx.Client) -> dict[str, Any]:
    (stats,) = http.get("/v2/models/crowd-csrnet/stats").json()["model_stats"]
    return dict(stats)


# --- models, docs ----------------------------------------------------------------------------


def test_models_lists_every_model_with_provenance_and_contract(http: httpx.Client, tiny_repo: ExportedRepo) -> None:
    body = http.get("/v1/models").json()
    names = sorted(p.name for p in tiny_repo.root.iterdir() if (p / "contract.json").is_file())
    assert [m["name"] for m in body["models"]] == names
    for model in body["models"]:
        contract = read_contract(tiny_repo.root / model["name"])
        assert model["family"] == contract.family and model["variant"] == contract.variant and model["ready"]
        assert model["provenance"]["weights"] == "random-init" and model["contract"]["model_sha256"] == contract.model_sha256
        assert model["partitions"] == ["cpu-0", "cpu-1"]


def test_openapi_documents_every_family_endpoint(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    for path in ("/v1/face/analyze", "/v1/frontalize", "/v1/grounding", "/v1/lns/segment", "/v1/crowd/count"):
        operation = spec["paths"][path]["post"]
        content = operation["requestBody"]["content"]
        assert {"multipart/form-data", "application/json"} <= set(content), path
        assert {"200", "413", "415", "422", "503", "504"} <= set(operation["responses"]), path
    assert "202" in spec["paths"]["/v1/lns/segment"]["post"]["responses"]
    assert "sentence" in spec["paths"]["/v1/grounding"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert {"/v1/models", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/labels.nii.gz"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert all(schemas[name].get("examples") for name in ("FaceResult", "GroundingResult", "CrowdResult", "LnsResult", "JobView"))
    assert http.get("/docs").status_code == 200
