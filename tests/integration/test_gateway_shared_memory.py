"""Triton's system shared memory extension, with tritonclient's own shared memory helpers, over HTTP and gRPC."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from migserve.contract import read_contract
from migserve.types import Array
from tests.helpers import ExportedRepo, Gateway, assert_equal_but_rounding, shm_key
from tests.integration.test_gateway_protocol import direct, grpc_inputs, make_inputs, triton_inputs


class Region:
    """A client's /dev/shm object (tritonclient's helpers), destroyed at the end."""

    def __init__(self, name: str, byte_size: int) -> None:
        self.name, self.key, self.byte_size = name, shm_key(name), byte_size
        self.handle = shm.create_shared_memory_region(name, self.key, byte_size)

    def destroy(self) -> None:
        shm.destroy_shared_memory_region(self.handle)


@pytest.fixture
def regions(gateway: Gateway) -> Iterator[dict[str, Region]]:
    """An input region holding face-pros inputs (batch 2) and a 4 KB output region, registered over HTTP."""
    made = {"in": Region("in", 2 * 3 * 224 * 224 * 4), "out": Region("out", 4096)}
    client = httpclient.InferenceServerClient(gateway.url)
    for region in made.values():
        client.register_system_shared_memory(region.name, region.key, region.byte_size)
    yield made
    client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status() == []
    for region in made.values():
        region.destroy()


def _face(tiny_repo: ExportedRepo, regions: dict[str, Region]) -> tuple[Array, list[Array]]:
    image = make_inputs(read_contract(tiny_repo.root / "face-pros"), 2, seed=21)["image"]
    shm.set_shared_memory_region(regions["in"].handle, [image])
    return image, direct(tiny_repo.root, "face-pros", {"image": image})


def test_http_reads_inputs_from_a_region_and_writes_outputs_into_one(
    gateway: Gateway, tiny_repo: ExportedRepo, regions: dict[str, Region]
) -> None:
    image, expected = _face(tiny_repo, regions)
    client = httpclient.InferenceServerClient(gateway.url)
    tensor = httpclient.InferInput("image", list(image.shape), "FP32")
    tensor.set_shared_memory("in", image.nbytes)
    embedding = httpclient.InferRequestedOutput("embedding", binary_data=True)
    embedding.set_shared_memory("out", 2 * 48 * 4, offset=256)
    result = client.infer("face-pros", [tensor], outputs=[embedding, httpclient.InferRequestedOutput("attributes")])
    assert result.get_output("embedding") == {"name": "embedding", "datatype": "FP32", "shape": [2, 48]}, "no data: it is in the region"
    # a CPU worker may run the two rows as two runs (service/workers/slices.py): equal to direct's one run up to rounding
    embedded = shm.get_contents_as_numpy(regions["out"].handle, np.float32, [2, 48], offset=256)
    assert_equal_but_rounding(embedded, expected[0])
    assert_equal_but_rounding(result.as_numpy("attributes"), expected[1])
    status = client.get_system_shared_memory_status("in")
    assert status == [{"name": "in", "key": regions["in"].key, "offset": 0, "byte_size": image.nbytes}]


def test_grpc_mixes_region_and_raw_inputs_and_answers_region_outputs_empty(
    gateway: Gateway, tiny_repo: ExportedRepo, regions: dict[str, Region]
) -> None:
    """grounding-mgsl has several inputs: the first comes from a region, the rest as raw contents."""
    assert gateway.grpc_url is not None
    client = grpcclient.InferenceServerClient(gateway.grpc_url)
    contract = read_contract(tiny_repo.root / "grounding-mgsl")
    arrays = make_inputs(contract, 1, seed=4)
    first, *rest = contract.inputs
    shm.set_shared_memory_region(regions["in"].handle, [arrays[first.name]])
    inputs = grpc_inputs(arrays)
    inputs[0] = grpcclient.InferInput(first.name, list(arrays[first.name].shape), inputs[0].datatype())
    inputs[0].set_shared_memory("in", arrays[first.name].nbytes)
    output = contract.outputs[0]
    wanted = grpcclient.InferRequestedOutput(output.name)
    expected = direct(tiny_repo.root, "grounding-mgsl", arrays)[0]
    wanted.set_shared_memory("out", expected.nbytes)
    result = client.infer("grounding-mgsl", inputs, outputs=[wanted])
    assert list(result.get_response().raw_output_contents) == [b""]
    got = shm.get_contents_as_numpy(regions["out"].handle, expected.dtype, list(expected.shape))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    status = client.get_system_shared_memory_status(as_json=True)["regions"]
    assert {name: int(region["byte_size"]) for name, region in status.items()} == {"in": regions["in"].byte_size, "out": 4096}
    assert len(rest) >= 1
    client.close()


def _infer_error(gateway: Gateway, header: dict[str, Any]) -> tuple[int, str]:
    response = httpx.post(f"http://{gateway.url}/v2/models/face-pros/infer", content=json.dumps(header), timeout=30)
    return response.status_code, response.json()["error"]


def _in(**parameters: Any) -> dict[str, Any]:
    return {"name": "image", "datatype": "FP32", "shape": [2, 3, 224, 224], "parameters": parameters}


def test_bad_regions_and_slices_get_a_4xx_that_names_the_problem(
    gateway: Gateway, tiny_repo: ExportedRepo, regions: dict[str, Region]
) -> None:
    image, _ = _face(tiny_repo, regions)
    size = image.nbytes
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"inputs": [_in(shared_memory_region="nope", shared_memory_byte_size=size)]}, 404, "unknown shared memory region 'nope'"),
        ({"inputs": [_in(shared_memory_region="in", shared_memory_byte_size=size - 4)]}, 400, f"needs {size}"),
        (
            {"inputs": [_in(shared_memory_region="in", shared_memory_byte_size=size, shared_memory_offset=8)]},
            400,
            f"input image: {size} bytes at offset 8 do not fit shared memory region 'in'",
        ),
        ({"inputs": [_in(shared_memory_region="in")]}, 400, "shared_memory_byte_size an integer"),
        (
            {"inputs": [_in(shared_memory_region="in", shared_memory_byte_size=size, binary_data_size=size)]},
            400,
            "in a shared memory region or in the request, not both",
        ),
        (
            {
                "inputs": [_in(shared_memory_region="in", shared_memory_byte_size=size)],
                "outputs": [{"name": "landmarks", "parameters": {"shared_memory_region": "out", "shared_memory_byte_size": 16}}],
            },
            400,
            "output landmarks: shared_memory_byte_size 16 is too small for its 1088 bytes",
        ),
        (
            {
                "inputs": [_in(shared_memory_region="in", shared_memory_byte_size=size)],
                "outputs": [
                    {
                        "name": "expression",
                        "parameters": {"shared_memory_region": "out", "shared_memory_byte_size": 64, "classification": 2},
                    }
                ],
            },
            400,
            "outputs ['expression']: a classification answer cannot go to a shared memory region",
        ),
    ]
    for header, status, message in cases:
        got_status, error = _infer_error(gateway, header)
        assert (got_status, message in error) == (status, True), (header, error)
    client = httpclient.InferenceServerClient(gateway.url)
    arenas = sorted(p.name for p in Path("/dev/shm").glob("migserve-arena-*"))
    assert arenas, "the gateway's arenas carry their prefix"
    for key, byte_size, message in [
        (regions["in"].key, 16, "'in' is already registered"),
        (shm_key("missing"), 16, f"cannot open shared memory key '{shm_key('missing')}'"),
        ("../etc/passwd", 16, "is not a /dev/shm name"),
        ("/..", 16, "is not a /dev/shm name"),
        (regions["out"].key, 8192, "is past the end of"),
        ("/" + arenas[0], 16, "is one of the gateway's own arenas"),
    ]:
        with pytest.raises(InferenceServerException) as caught:
            client.register_system_shared_memory("in" if "already" in message else "other", key, byte_size)
        assert caught.value.status() == "400" and message in str(caught.value.message())
    with pytest.raises(InferenceServerException) as missing:
        client.get_system_shared_memory_status("never-registered")
    assert missing.value.status() == "404"
    result = client.infer("face-pros", triton_inputs({"image": image}))  # still serving
    assert result.as_numpy("embedding").shape == (2, 48)


def test_a_region_whose_object_shrank_is_refused_not_read_past_its_end(gateway: Gateway, tiny_repo: ExportedRepo) -> None:
    """Reading a mapping past the end of its (since truncated) object kills the reader with SIGBUS: the gateway
    checks the object's size at each use and answers 400 instead."""
    image = make_inputs(read_contract(tiny_repo.root / "face-pros"), 1, seed=5)["image"]
    region = Region("shrinks", image.nbytes)
    client = httpclient.InferenceServerClient(gateway.url)
    try:
        shm.set_shared_memory_region(region.handle, [image])
        client.register_system_shared_memory(region.name, region.key, image.nbytes)
        os.truncate(Path("/dev/shm") / region.key.lstrip("/"), 4096)
        tensor = httpclient.InferInput("image", list(image.shape), "FP32")
        tensor.set_shared_memory(region.name, image.nbytes)
        with pytest.raises(InferenceServerException) as caught:
            client.infer("face-pros", [tensor])
        assert caught.value.status() == "400" and "shrank to 4096 bytes" in str(caught.value.message())
        assert client.infer("face-pros", triton_inputs({"image": image})).as_numpy("embedding").shape == (1, 48)
    finally:
        client.unregister_system_shared_memory(region.name)
        region.destroy()
