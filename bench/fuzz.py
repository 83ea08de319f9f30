"""Seeded fuzzing of the gateway's error paths: bad input gets a clear 4xx and disturbs nothing (issue 3).

Starts `migserve serve` on the tiny models, with gRPC and `--receive-timeout-s 2`, and sends mutated requests of
eight kinds, all from real ones: `infer-http` (KServe v2 binary and JSON bodies: the JSON header's values replaced,
removed or added, Inference-Header-Content-Length wrong, bytes flipped, tensors placed in a registered shared memory
region at offsets and sizes that may not fit), `http-head` (a raw exchange on a socket: the request line, header
names and values, line endings and body framing mutated, requests pipelined behind it), `infer-grpc` (ModelInfer and
ModelStreamInfer with shapes, datatypes, raw contents, typed contents and parameters mutated), `uploads` (JPEG, PNG,
.npy, NIfTI, gzipped NIfTI, a DICOM file and zipped DICOM, stored and deflated, with bytes flipped, cut, inserted;
CT jobs followed to their end), `multipart` (the form itself damaged), `control-http` (the JSON of /v2/logging,
trace settings, shared memory registration, repository calls, the /v1 JSON forms, GETs of odd names, and GETs (long
polls with odd `wait_s`) and DELETEs of jobs, the last one an upload ran among them), `control-grpc` (the same calls
over gRPC) and `timing` (a valid request whose timing or connection's end varies: sent in pieces with pauses, some
past the receive timeout; the client gone mid-request or before its answer, by a FIN or a reset; a half-close;
pipelined copies; gRPC deadlines too short to meet). A failure: an answer of 500 (501, 503 and 504 allowed), a gRPC
INTERNAL, UNKNOWN or UNAVAILABLE, an answer slower than half a minute (10 s for a raw exchange, which a stalled one
gets as 408), a lost connection (one HTTP client per kind keeps its connection alive across requests, so a reset
after an answer shows), a failed CT job, a traceback in the gateway's log (`results/fuzz-serve.log`: an exception
after an answer, which no status shows), anything still held once all requests have ended (the bodies
`--max-pending-mb` counts, the models' queues: `leaks`). A valid request every 50 checks that the gateway still
serves.

    .venv/bin/python -m bench.fuzz --requests 300 --seed 1
    .venv/bin/python -m bench.fuzz --kinds uploads,control-grpc --seed 2 --serve=--frontends=2
    .venv/bin/python -m bench.fuzz --revision a8dd263   # the service before the fixes this found
    .venv/bin/python -m bench.fuzz --kinds timing --requests 150 --seed 2 --revision d87909f   # before the 408's linger

It prints the answers per kind and status, each failure with the request that caused it, and exits 1 if any.
"""

from __future__ import annotations

import argparse
import base64
import copy
import functools
import gzip
import io
import json
import random
import socket
import struct
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench.gateway_bench import DATATYPES, ROOT, Server, export, sample
from bench.ports import free_port
from tests.integration.test_family_endpoints import ASTRONAUT, CT_SMALL, NIBABEL_DATA, encode, lfw_faces, npy

MODELS = ("crowd-csrnet", "face-pros", "frontalize-dalgan", "grounding-mgsl", "lns-organs", "lns-stations")
DIMS: dict[str, dict[str, int]] = {"crowd-csrnet": {"height": 16, "width": 16}}
PARAMETER_VALUES: dict[str, list[Any]] = {
    "bool_param": [True, False],
    "int64_param": [-1, 0, 1, 2**62, 10**6],
    "uint32_param": [0, 1, 2**32 - 1],
    "uint64_param": [0, 1, 2**64 - 1],
    "double_param": [-1.0, 0.5, 1e300],
    "string_param": ["", "x", "region", "1e3", "é"],
    "bytes_param": [b"", b"\xff" * 8, b"{}"],
}
REGION, REGION_BYTES = "fuzz", 1 << 20  # registered at the start, over /dev/shm/fuzz, for requests to name
KINDS = ("infer-http", "http-head", "infer-grpc", "uploads", "multipart", "control-http", "control-grpc", "timing")
RECEIVE_TIMEOUT_S = 2.0  # the gateway's --receive-timeout-s here
PAUSES_S = (0.0, 0.02, 0.3, RECEIVE_TIMEOUT_S + 1.0)  # within a request: a pause past the receive timeout gets 408
RAW_S = 10.0  # a raw exchange's answer must come within this (the gateway runs with --receive-timeout-s 2)
ANSWER_S = 60.0
JUNK: list[Any] = [None, True, False, -1, 0, 1, 2**63, -(2**63), 2**64, 1.5, 1e308, "", "x", "1", "FP32", "BYTES", "INT8"]
JUNK += [[], [1], [[1]], {}, {"a": [None]}, [-1, 3], [0], [2**31, 2**31], "\u0000", "é", "a" * 3000, "/../etc/passwd"]
RAW_TARGETS = [
    b"/v2/models/crowd-csrnet/versions/1/infer",
    b"/v2/models/crowd-csrnet/versions/2/infer",
    b"/v2/models/crowd%2Dcsrnet/infer",
    b"/v2/models/crowd-csrnet/infer?x=1",
    b"//v2/models/crowd-csrnet/infer",
    b"/v2/models//infer",
    b"/v2/models/" + b"a" * 5000 + b"/infer",
    b"*",
    b"/v2/models/\xff/infer",
]
RAW_FIELDS = [
    (b"Content-Length", b"0"),
    (b"Content-Length", b"3"),
    (b"Transfer-Encoding", b"chunked"),
    (b"Expect", b"100-continue"),
    (b"Connection", b"close"),
    (b"Connection", b"upgrade"),
    (b"Upgrade", b"h2c"),
    (b"X-Timeout-Ms", b"-5"),
    (b"X-Timeout-Ms", b"99999999999999999999"),
    (b"Inference-Header-Content-Length", b"5"),
    (b"Accept-Encoding", b"gzip;q=0, deflate"),
    (b"Content-Encoding", b"gzip"),
    (b"Content-Encoding", b"br"),
    (b" folded", b"line"),
]
NAMES = ["crowd-csrnet", "face-pros", "nope", "", "é", "a" * 300, "..", "%2e%2e", "x/y"]
KEYS = ["parameters", "name", "datatype", "shape", "data", "id", "binary_data", "binary_data_size", "classification"]
KEYS += ["shared_memory_region", "shared_memory_byte_size", "shared_memory_offset", "timeout", "priority", "key", "offset"]
KEYS += ["byte_size", "trace_level", "trace_rate", "trace_count", "log_frequency", "trace_file", "log_info", "config"]


@dataclass
class Tally:
    answers: Counter[tuple[str, str]] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def record(self, kind: str, outcome: str, failed: bool, what: Callable[[], str]) -> None:
        self.answers[kind, outcome] += 1
        if failed:
            self.failures.append(f"{kind}: {outcome}: {what()[:600]}")


class Fuzzer:
    def __init__(self, repo: Path, server: Server, grpc_port: int, seed: int) -> None:
        self.repo, self.server, self.rng = repo, server, random.Random(seed)
        self.base = f"http://127.0.0.1:{server.port}"
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.max_receive_message_length", 1 << 30)])
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        self.clients = {kind: httpx.Client(base_url=self.base, timeout=ANSWER_S) for kind in KINDS}
        faces = lfw_faces(1)[0]
        nifti = (NIBABEL_DATA / "anatomical.nii").read_bytes()
        dicom = CT_SMALL.read_bytes()
        self.images = [encode(ASTRONAUT), faces]
        self.files = {
            "nifti": nifti,
            "nifti.gz": gzip.compress(nifti, mtime=0),
            "dicom": dicom,
            "dicom zip": _zipped("a.dcm", dicom, zipfile.ZIP_STORED),
            "dicom zip, deflated": _zipped("a.dcm", dicom, zipfile.ZIP_DEFLATED),
        }
        self.contracts = {model: json.loads((repo / model / "contract.json").read_text()) for model in MODELS}  # read once
        image = self._sampled("crowd-csrnet")["image"]
        described = {
            "inputs": [{"name": "image", "datatype": "FP32", "shape": list(image.shape), "parameters": {"binary_data_size": image.nbytes}}]
        }
        self.small_header = json.dumps(described).encode()
        self.small_body = self.small_header + image.tobytes()
        self.features = npy(np.random.default_rng(seed).standard_normal((40, 1024)).astype(np.float32))
        self.tally = Tally()
        self.last_job: str | None = None  # a CT job that ran to its end (uploads), for the control calls to ask for and delete

    def _sampled(self, model: str) -> dict[str, Any]:
        """One row of each of the model's inputs, as the benches make them."""
        return sample(self.contracts[model], DIMS.get(model, {}), 1)

    # mutations

    def junk(self, depth: int = 0) -> Any:
        if depth < 2 and self.rng.random() < 0.15:
            return {self.rng.choice(KEYS): self.junk(depth + 1) for _ in range(self.rng.randint(0, 3))}
        return self.rng.choice(JUNK)

    def mutate(self, node: Any) -> Any:
        """A JSON value with one thing changed somewhere inside: a value replaced, a key or item removed or added."""
        rng = self.rng
        if isinstance(node, dict):
            if node and rng.random() < 0.6:
                key = rng.choice(list(node))
                roll = rng.random()
                if roll < 0.3:
                    node[key] = self.junk()
                elif roll < 0.45:
                    del node[key]
                else:
                    node[key] = self.mutate(node[key])
            else:
                node[rng.choice(KEYS)] = self.junk()
            return node
        if isinstance(node, list):
            roll = rng.random()
            if node and roll < 0.35:
                index = rng.randrange(len(node))
                node[index] = self.mutate(node[index])
            elif node and roll < 0.55:
                node.pop(rng.randrange(len(node)))
            elif node and roll < 0.75:
                node.append(copy.deepcopy(rng.choice(node)))
            else:
                node.append(self.junk())
            return node
        return self.junk() if rng.random() < 0.7 else node

    def damaged(self, data: bytes) -> bytes:
        """Bytes flipped (mostly near the start, where the headers are), cut short, or bytes inserted."""
        rng, out = self.rng, bytearray(data)
        roll = rng.random()
        if roll < 0.5:
            for _ in range(rng.choice([1, 2, 5, 20])):
                out[rng.randrange(min(len(out), rng.choice([64, 512, 4096, len(out)])))] = rng.randrange(256)
        elif roll < 0.7:
            del out[rng.randrange(len(out)) :]
        elif roll < 0.85:
            at = rng.randrange(len(out))
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
        else:
            at, width = rng.randrange(min(len(out), 600)), rng.choice([1, 2, 4, 8])
            out[at : at + width] = rng.choice([b"\xff", b"\x00", b"\x7f"]) * width
        return bytes(out)

    # the kinds

    def infer_http(self) -> None:
        rng = self.rng
        model = rng.choice(["crowd-csrnet", "face-pros", "grounding-mgsl"])
        contract, arrays = self.contracts[model], self._sampled(model)
        inputs = [{"name": k, "datatype": DATATYPES[v.dtype.name], "shape": list(v.shape)} for k, v in arrays.items()]
        header: dict[str, Any] = {
            "inputs": [e | {"parameters": {"binary_data_size": a.nbytes}} for e, a in zip(inputs, arrays.values(), strict=True)],
            "outputs": [{"name": o["name"], "parameters": {"binary_data": True}} for o in contract["outputs"]],
        }
        blob = b"".join(a.tobytes() for a in arrays.values())
        roll = rng.random()
        headers: dict[str, str] = {}
        if roll < 0.55:
            text = json.dumps(self.mutate(self.mutate(header))).encode()
            body, headers["Inference-Header-Content-Length"] = text + blob, str(len(text))
        elif roll < 0.7:
            text = json.dumps(header).encode()
            body = text + blob
            wrong = rng.choice([len(text) - 1, len(text) + 1, 0, -1, len(body) + 10, "abc", "", "1e3", 2**70, f"{len(text)}, 7"])
            headers["Inference-Header-Content-Length"] = str(wrong)
            if rng.random() < 0.3:
                body = body[: rng.randrange(len(body))]
        elif roll < 0.85:
            listed = [e | {"data": a.ravel().tolist()} for e, a in zip(inputs, arrays.values(), strict=True)]
            body, headers["Content-Type"] = json.dumps(self.mutate({"inputs": listed})).encode(), "application/json"
        else:
            text = json.dumps(header).encode()
            body = self.damaged(text) + blob
            headers["Inference-Header-Content-Length"] = str(len(text))
        if rng.random() < 0.15:  # an input or output in the registered region, at an offset and size that may not fit
            body = json.dumps(
                {"inputs": [e | {"parameters": self.in_region()} for e in inputs], "outputs": self.outputs_in_region(contract)}
            ).encode()
            headers = {"Content-Type": "application/json"}
        if rng.random() < 0.1:
            headers[rng.choice(["Content-Encoding", "X-Timeout-Ms", "Accept-Encoding"])] = rng.choice(
                ["gzip", "x", "0", "-1", "nan", "1e9"]
            )
        self._http("infer-http", "POST", f"/v2/models/{model}/infer", body, headers)

    def in_region(self) -> dict[str, Any]:
        """Parameters naming the registered region (REGION_BYTES), at an offset and size that may not fit it."""
        sizes = [0, 1, 3072, REGION_BYTES, REGION_BYTES + 1, 2**62, -1]
        where = {"shared_memory_region": REGION, "shared_memory_byte_size": self.rng.choice(sizes)}
        if self.rng.random() < 0.7:
            where["shared_memory_offset"] = self.rng.choice([0, 1, 4, REGION_BYTES - 1, REGION_BYTES, 2**63 - 1, -4096])
        return where

    def outputs_in_region(self, contract: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"name": o["name"], "parameters": self.in_region()} for o in contract["outputs"] if self.rng.random() < 0.5]

    def http_head(self) -> None:
        """A raw HTTP/1.1 exchange with its request line, headers and framing mutated, the answer read off the socket:
        what the gateway's own head parser (service/api/connection.py) and uvicorn's, after a hand-over, see."""
        rng, body = self.rng, self.small_body
        line = [b"POST", b"/v2/models/crowd-csrnet/infer", b"HTTP/1.1"]
        fields = [
            (b"Host", b"gateway"),
            (b"Content-Length", b"%d" % len(body)),
            (b"Inference-Header-Content-Length", b"%d" % len(self.small_header)),
        ]
        ending, chunked = b"\r\n", False
        for _ in range(rng.randint(1, 3)):
            roll = rng.random()
            if roll < 0.12:
                line[0] = rng.choice([b"GET", b"PUT", b"post", b"", b"P\x00ST"])
            elif roll < 0.27:
                line[1] = rng.choice(RAW_TARGETS)
            elif roll < 0.35:
                line[2] = rng.choice([b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b"", b"http/1.1"])
            elif roll < 0.55:
                fields.append(rng.choice(RAW_FIELDS))
                chunked = chunked or (fields[-1][0] == b"Transfer-Encoding" and rng.random() < 0.5)
            elif roll < 0.7:
                index = rng.randrange(len(fields))
                name, value = fields[index]
                fields[index] = (
                    name,
                    rng.choice(
                        [b" " + value, value + b" ", b"+" + value, b"0x10", b"-1", b"1" * 30, value + b",", b"\x00", b"\xff" * 3, b""]
                    ),
                )
            elif roll < 0.8:
                index = rng.randrange(len(fields))
                name, value = fields[index]
                fields[index] = (rng.choice([name + b" ", b" " + name, name.lower(), name.upper(), b"", b"X:Y", name + b"\x00"]), value)
            elif roll < 0.88:
                ending = rng.choice([b"\n", b"\r", b"\r\n\r"])  # lines, and the head's end, not ended by CRLF
            else:
                body = rng.choice([body[: rng.randrange(len(body))], body + b"garbage", body + b"GET /v2 HTTP/1.1\r\n\r\n"])
        if chunked:
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        head = ending.join([b" ".join(line), *(name + b": " + value for name, value in fields)]) + ending + ending
        outcome = _exchange(self.server.port, head + body)
        failed = (outcome.startswith("5") and outcome[:3] not in ("501", "503", "504")) or not outcome[:1].isdigit()  # no answer
        self.tally.record("http-head", outcome, failed, lambda: repr(head[:400]))

    def uploads(self) -> None:
        rng = self.rng
        kind = rng.choice(["image", "features", *self.files])
        if kind == "image":
            path = rng.choice(["/v1/face/analyze", "/v1/frontalize", "/v1/crowd/count"])
            files, form = {"image": ("upload", self.damaged(rng.choice(self.images)))}, {}
        elif kind == "features":
            path, form = "/v1/grounding", {"sentence": "person opens a door", "duration": "12.5"}
            files = {"features": ("f.npy", self.damaged(self.features))}
        else:
            path, files = "/v1/lns/segment", {"volume": ("upload", self.damaged(self.files[kind]))}
            form = {"mode": "job"} if rng.random() < 0.3 else {}  # followed to its end: a job must not fail
        request = self.clients["uploads"].build_request("POST", path, files=files, data=form)
        self._send("uploads", request, lambda: f"{kind} to {path}")

    def multipart(self) -> None:
        rng = self.rng
        path = rng.choice(["/v1/face/analyze", "/v1/crowd/count", "/v1/frontalize"])
        form = {"detect": "false", "max_faces": "3"} if path == "/v1/face/analyze" else {}
        valid = httpx.Request("POST", self.base + path, files={"image": ("face.png", self.images[1], "image/png")}, data=form)
        body, content_type = bytearray(valid.read()), valid.headers["content-type"]
        for _ in range(rng.randint(1, 6)):
            if len(body) < 2:
                break
            at = rng.randrange(len(body)) if rng.random() < 0.5 else rng.randrange(min(400, len(body)))
            roll = rng.random()
            if roll < 0.4:
                body[at] = rng.randrange(256)
            elif roll < 0.6:
                del body[at : at + rng.randint(1, 50)]
            elif roll < 0.85:
                body[at:at] = rng.choice([b"\r\n", b"--", b'"', b";", b'Content-Disposition: form-data; name="image"\r\n', b"\x00" * 10])
            else:
                del body[rng.randrange(len(body)) :]
        if rng.random() < 0.2:
            boundary = content_type.split("boundary=")[1]
            content_type = rng.choice(["multipart/form-data", "multipart/form-data; boundary=", f"multipart/mixed; boundary={boundary}"])
        self._http("multipart", "POST", path, bytes(body), {"content-type": content_type})

    def control_http(self) -> None:
        rng = self.rng
        name = rng.choice(NAMES)
        roll = rng.random()
        body: dict[str, Any] | None = {k: self.junk() for k in rng.sample(KEYS, rng.randint(0, 4))}
        if roll < 0.12:
            path = "/v2/logging"
            body = self.mutate({"log_info": True, "log_verbose_level": 0})
        elif roll < 0.25:
            path = rng.choice(["/v2/trace/setting", f"/v2/models/{name}/trace/setting"])
            body = self.mutate({"trace_level": ["OFF"], "trace_rate": "1000", "trace_count": "-1"})
        elif roll < 0.38:
            path = f"/v2/systemsharedmemory/region/{rng.choice(['r', name])}/register"
            body = self.mutate({"key": "/fuzz", "offset": 0, "byte_size": 4096})
        elif roll < 0.42:
            path, body = rng.choice(["/v2/systemsharedmemory/unregister", f"/v2/systemsharedmemory/region/{name}/unregister"]), None
        elif roll < 0.5:
            path, body = "/v2/repository/index", self.mutate({"ready": True})
        elif roll < 0.58:
            path = f"/v2/repository/models/{name}/{rng.choice(['load', 'unload'])}"
        elif roll < 0.8:
            path = rng.choice(["/v1/face/analyze", "/v1/frontalize", "/v1/crowd/count", "/v1/grounding", "/v1/lns/segment"])
            image = base64.b64encode(rng.choice([*self.images, self.images[0][:500], b""])).decode()
            body = self.mutate({"image": image, "sentence": "a person", "duration": 5.0, "features": [[0.0] * 1024] * 3})
        elif roll < 0.9:
            job = rng.choice([name, "0" * 32, self.last_job or name])
            wait = rng.choice(["0", "0.05", "-1", "61", "nan", "inf", "1e309", "soon", ""])
            path = rng.choice([f"/v1/jobs/{job}", f"/v1/jobs/{job}?wait_s={wait}", f"/v1/jobs/{job}/labels.nii.gz"])
            self._http("control-http", rng.choice(["GET", "GET", "DELETE"]), path, b"", {})
            return
        else:
            path, body = rng.choice([f"/v2/models/{name}", f"/v2/models/{name}/ready", f"/v2/models/{name}/config"]), None
        if body is None:
            self._http("control-http", "GET" if path.startswith("/v2/models") else "POST", path, b"", {})
            return
        text = json.dumps(body).encode()
        self._http(
            "control-http", "POST", path, text if rng.random() < 0.9 else text[: rng.randint(0, 20)], {"content-type": "application/json"}
        )

    def infer_grpc(self) -> None:
        rng = self.rng
        model = rng.choice(["crowd-csrnet", "face-pros", "grounding-mgsl"])
        contract, arrays = self.contracts[model], self._sampled(model)
        request = service_pb2.ModelInferRequest(model_name=model)
        for name, array in arrays.items():
            request.inputs.add(name=name, datatype=DATATYPES[array.dtype.name], shape=array.shape)
            request.raw_input_contents.append(array.tobytes())
        for output in contract["outputs"]:
            request.outputs.add(name=output["name"])
        for _ in range(rng.randint(1, 3)):
            self._mutate_infer_request(request, arrays)
        if rng.random() < 0.15:
            del request.raw_input_contents[:]
            for tensor in [*request.inputs, *request.outputs]:
                for key, value in self.in_region().items():
                    if key == "shared_memory_region":
                        tensor.parameters[key].string_param = value
                    else:
                        tensor.parameters[key].int64_param = value
        streamed = rng.random() < 0.2
        try:
            if streamed:
                answers = list(self.stub.ModelStreamInfer(iter([request, request]), timeout=ANSWER_S))
                errors = [a.error_message for a in answers if a.error_message]
                outcome = "stream: errors" if errors else "stream: answers"
                failed = len(answers) != 2 or any("internal" in e.lower() for e in errors)
            else:
                self.stub.ModelInfer(request, timeout=ANSWER_S)
                outcome, failed = "OK", False
        except grpc.RpcError as exc:
            outcome = exc.code().name
            failed = exc.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE)
            failed = failed or (exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline passed" not in (exc.details() or ""))
        self.tally.record("infer-grpc", outcome, failed, lambda: str(request)[:600])

    def _mutate_infer_request(self, request: Any, arrays: dict[str, Any]) -> None:
        rng, roll = self.rng, self.rng.random()
        tensors = request.inputs
        if roll < 0.1 and tensors:
            rng.choice(tensors).datatype = rng.choice(["FP32", "FP16", "INT64", "BYTES", "BOOL", "", "x"])
        elif roll < 0.2 and tensors:
            tensor = rng.choice(tensors)
            del tensor.shape[:]
            tensor.shape.extend(rng.choice([[], [0], [1], [-1, 3], [2**40, 2**40], [1, 3, 16, 16], [1] * 9]))
        elif roll < 0.3 and request.raw_input_contents:
            index = rng.randrange(len(request.raw_input_contents))
            raw = request.raw_input_contents[index]
            request.raw_input_contents[index] = raw[: rng.randrange(len(raw) + 1)] if rng.random() < 0.5 else raw + b"\0" * 3
        elif roll < 0.4:
            del request.raw_input_contents[:]
            for tensor in tensors:
                if (array := arrays.get(tensor.name)) is not None:
                    count = rng.choice([array.size, array.size - 1, 1])
                    tensor.contents.fp32_contents.extend(array.ravel().astype(np.float32)[:count])
        elif roll < 0.47:
            request.raw_input_contents.append(b"\0" * rng.choice([0, 4, 3072]))
        elif roll < 0.54 and tensors:
            del tensors[rng.randrange(len(tensors))]
        elif roll < 0.6 and tensors:
            tensors.add().CopyFrom(rng.choice(tensors))
        elif roll < 0.66 and tensors:
            rng.choice(tensors).name = rng.choice(["", "img", "x" * 1000])
        else:
            self._mutate_parameters(request, roll)

    def _mutate_parameters(self, request: Any, roll: float) -> None:
        rng, tensors = self.rng, request.inputs
        if roll < 0.74:
            self._junk_parameter(request.parameters[rng.choice(["binary_data_output", "timeout", "priority", "sequence_id", "x"])])
        elif roll < 0.82 and tensors:
            where = rng.choice(tensors).parameters[rng.choice(["shared_memory_region", "shared_memory_byte_size", "binary_data_size"])]
            self._junk_parameter(where)
        elif roll < 0.9 and request.outputs:
            self._junk_parameter(rng.choice(request.outputs).parameters[rng.choice(["classification", "shared_memory_region"])])
        elif roll < 0.95:
            request.outputs.add(name=rng.choice(["", "nope", "density"]))
        else:
            request.model_name, request.model_version = rng.choice(NAMES), rng.choice(["", "1", "2", "x"])

    def _junk_parameter(self, parameter: Any) -> None:
        """One of the message's value fields set (InferParameter, ModelRepositoryParameter and SettingValue differ)."""
        name = self.rng.choice(list(parameter.DESCRIPTOR.fields_by_name))
        setattr(parameter, name, self.rng.choice(PARAMETER_VALUES[name]))

    def control_grpc(self) -> None:
        rng, stub = self.rng, self.stub

        def text() -> str:
            return str(rng.choice(["", "x", "1", "/fuzz", "TIMESTAMPS", "OFF", "-1", "1e400", "é", "a" * 500]))

        roll, name = rng.random(), rng.choice(NAMES)
        call: Callable[[], Any]
        if roll < 0.15:
            offset, size = rng.choice([0, 1, 4096, 2**63, 2**64 - 1]), rng.choice([0, 1, 4096, 4097, 2**64 - 1])
            register = service_pb2.SystemSharedMemoryRegisterRequest(
                name=rng.choice(["r", text()]), key=text(), offset=offset, byte_size=size
            )
            call = lambda: stub.SystemSharedMemoryRegister(register, timeout=ANSWER_S)  # noqa: E731
        elif roll < 0.22:
            call = lambda: stub.SystemSharedMemoryUnregister(service_pb2.SystemSharedMemoryUnregisterRequest(name=text()), timeout=ANSWER_S)  # noqa: E731
        elif roll < 0.4:
            trace = service_pb2.TraceSettingRequest(model_name=rng.choice([*NAMES, "", ""]))
            for key in rng.sample(
                ["trace_level", "trace_rate", "trace_count", "log_frequency", "trace_file", "trace_mode", "x"], rng.randint(0, 4)
            ):
                trace.settings[key].value.extend([text() for _ in range(rng.randint(0, 2))])
            call = lambda: stub.TraceSetting(trace, timeout=ANSWER_S)  # noqa: E731
        elif roll < 0.55:
            logs = service_pb2.LogSettingsRequest()
            for key in rng.sample(
                ["log_info", "log_warning", "log_error", "log_verbose_level", "log_format", "log_file", "x"], rng.randint(0, 3)
            ):
                self._junk_parameter(logs.settings[key])
            call = lambda: stub.LogSettings(logs, timeout=ANSWER_S)  # noqa: E731
        elif roll < 0.7:
            load = service_pb2.RepositoryModelLoadRequest(model_name=name)
            for key in rng.sample(["config", "file:1/model.onnx", "x"], rng.randint(0, 2)):
                self._junk_parameter(load.parameters[key])
            unload = service_pb2.RepositoryModelUnloadRequest(model_name=name)
            call = rng.choice(
                [lambda: stub.RepositoryModelLoad(load, timeout=ANSWER_S), lambda: stub.RepositoryModelUnload(unload, timeout=ANSWER_S)]
            )
        else:
            version = rng.choice(["", "1", "0", "x", "99999999999999999999"])
            call = rng.choice(
                [
                    lambda: stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=name, version=version), timeout=ANSWER_S),
                    lambda: stub.ModelConfig(service_pb2.ModelConfigRequest(name=name, version=version), timeout=ANSWER_S),
                    lambda: stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name=name, version=version), timeout=ANSWER_S),
                ]
            )
        detail = ""
        try:
            call()
            outcome, failed = "OK", False
        except grpc.RpcError as exc:
            outcome = exc.code().name
            failed = exc.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED)
            detail = exc.details() or ""
        self.tally.record("control-grpc", outcome, failed, lambda: f"roll {roll:.2f}: {detail}")

    def timing(self) -> None:
        """A valid request whose timing, or whose connection's end, is what varies: sent in pieces with pauses (200,
        or 408 once a pause outlasts the receive timeout); the client gone part way through it or before its answer,
        by a FIN or a reset (nothing to answer; what it held must be given back, which the end of the run checks);
        the request then the client's half-close (taken for a hang-up, as uvicorn and nginx take it: closed, no
        answer); several pipelined in one write (each answered, in order); a gRPC call whose deadline is too short to
        meet (DEADLINE_EXCEEDED or OK, and the gateway not left working on it)."""
        rng = self.rng
        target = rng.choice([b"/v2/models/crowd-csrnet/infer", b"/v2/models/crowd-csrnet/infer?to=uvicorn"])  # a query: handed over
        head = b"POST %s HTTP/1.1\r\nHost: gateway\r\nContent-Length: %d\r\n" % (target, len(self.small_body))
        request = head + b"Inference-Header-Content-Length: %d\r\n\r\n" % len(self.small_header) + self.small_body
        roll = rng.random()
        if roll < 0.3:
            cuts = sorted(rng.sample(range(1, len(request)), rng.randint(1, 4)))
            pauses = [rng.choice(PAUSES_S) for _ in cuts]
            pieces = [request[a:b] for a, b in zip([0, *cuts], [*cuts, len(request)], strict=True)]
            outcome = _paced(self.server.port, pieces, pauses)
            allowed = {"408" if max(pauses) > RECEIVE_TIMEOUT_S else "200"}
            if sum(pause > RECEIVE_TIMEOUT_S for pause in pauses) > 1:  # the lingering after the 408 ends as long a
                allowed.add("reset before an answer")  # pause, and what the client sends after it meets a closed socket
            failed = outcome not in allowed
            self.tally.record("timing", f"paced: {outcome}", failed, lambda: f"{target!r}, pauses {pauses} at {cuts}")
        elif roll < 0.55:
            cut = rng.randrange(1, len(request))
            reset = rng.random() < 0.5
            _gone(self.server.port, request[:cut], reset)
            self.tally.record("timing", f"gone mid-request ({'reset' if reset else 'FIN'})", False, str)
        elif roll < 0.7:
            reset = rng.random() < 0.5
            _gone(self.server.port, request, reset)
            self.tally.record("timing", f"gone before the answer ({'reset' if reset else 'FIN'})", False, str)
        elif roll < 0.8:
            outcome = _exchange(self.server.port, request, half_close=True)
            self.tally.record("timing", f"half-closed: {outcome}", outcome != "closed before an answer", lambda: repr(target))
        elif roll < 0.9:
            count = rng.randint(2, 5)
            statuses = _pipelined(self.server.port, request, count)
            ok = statuses == ["200"] * count
            self.tally.record("timing", f"pipelined: {'ok' if ok else statuses}", not ok, lambda: repr(target))
        else:
            self._short_deadline()

    def _short_deadline(self) -> None:
        arrays = self._sampled("face-pros")
        call = service_pb2.ModelInferRequest(model_name="face-pros")
        for name, array in arrays.items():
            call.inputs.add(name=name, datatype=DATATYPES[array.dtype.name], shape=array.shape)
            call.raw_input_contents.append(array.tobytes())
        deadline = self.rng.choice([0.001, 0.005, 0.02])
        try:
            self.stub.ModelInfer(call, timeout=deadline)
            outcome = "OK"
        except grpc.RpcError as exc:
            outcome = exc.code().name
        failed = outcome not in ("OK", "DEADLINE_EXCEEDED")
        self.tally.record("timing", f"grpc deadline {deadline * 1000:g} ms: {outcome}", failed, lambda: f"deadline {deadline} s")

    # sending

    def _http(self, kind: str, method: str, path: str, body: bytes, headers: dict[str, str]) -> None:
        request = self.clients[kind].build_request(method, path, content=body, headers=headers)
        self._send(kind, request, lambda: f"{method} {path} {headers} {body[:300]!r}")

    def _send(self, kind: str, request: httpx.Request, what: Callable[[], str]) -> None:
        started = time.monotonic()
        try:
            response = self.clients[kind].send(request)
        except httpx.HTTPError as exc:
            self.tally.record(kind, type(exc).__name__, True, what)
            return
        slow = time.monotonic() - started > ANSWER_S / 2
        failed = (response.status_code >= 500 and response.status_code not in (501, 503, 504)) or slow
        self.tally.record(kind, str(response.status_code), failed, lambda: f"{response.text[:300]} <- {what()}")
        if response.status_code == 202:  # a CT job: its input was checked before it was accepted, so it must succeed
            self._follow(kind, self.clients[kind], response.json()["status_url"], what)

    def _follow(self, kind: str, client: httpx.Client, url: str, what: Callable[[], str]) -> None:
        deadline = time.monotonic() + ANSWER_S
        while (view := client.get(url, params={"wait_s": 1}).json())["state"] == "running" and time.monotonic() < deadline:
            pass
        self.last_job = view["id"]  # for the control calls to ask for, and delete
        self.tally.record(kind, f"job {view['state']}", view["state"] != "done", lambda: f"{view.get('error')} <- {what()}")

    def register_region(self) -> None:
        """The region the requests name; the control calls may unregister it (then they get 400s for it)."""
        where = {"key": "/fuzz", "offset": 0, "byte_size": REGION_BYTES}
        httpx.post(f"{self.base}/v2/systemsharedmemory/region/{REGION}/unregister", timeout=ANSWER_S).raise_for_status()
        httpx.post(f"{self.base}/v2/systemsharedmemory/region/{REGION}/register", json=where, timeout=ANSWER_S).raise_for_status()

    def still_serves(self) -> None:
        ready = httpx.get(f"{self.base}/v2/health/ready", timeout=ANSWER_S)
        self.tally.record("health", str(ready.status_code), ready.status_code != 200, lambda: ready.text)

    def leaks(self) -> None:
        """Once the requests have ended, nothing is still held for them: the bodies --max-pending-mb counts and the
        models' queues back to 0 (within 5 s: a reset connection's request may still be in a batch)."""
        deadline, held = time.monotonic() + 5, {}
        while time.monotonic() < deadline:
            text = httpx.get(f"{self.base}/metrics", timeout=ANSWER_S).text
            held = {
                name: sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))
                for name in ("migserve_request_body_bytes ", "migserve_queue_depth{")
            }
            if not any(held.values()):
                break
            time.sleep(0.2)
        self.tally.record("leaks", "none" if not any(held.values()) else "held", any(held.values()), lambda: str(held))


def _exchange(port: int, request: bytes, half_close: bool = False) -> str:
    """The first answer's status to `request` on a new connection ("100" interim answers skipped), or what became of
    the connection: closed or reset before an answer, or no answer in RAW_S while it stayed open. `half_close`: the
    client's side shut for writing once the request is sent."""
    return _paced(port, [request], [], half_close)


def _paced(port: int, pieces: list[bytes], pauses: list[float], half_close: bool = False) -> str:
    """`_exchange` of a request sent in `pieces`, with a pause before each but the first."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=RAW_S) as sock:
        try:
            for piece, pause in zip(pieces, [0.0, *pauses], strict=True):
                time.sleep(pause)
                sock.sendall(piece)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            while (status := _first_answer(received)) is None:
                chunk = sock.recv(65536)
                if not chunk:
                    return "closed before an answer"
                received += chunk
        except TimeoutError:
            return f"no answer in {RAW_S:g} s"
        except (ConnectionResetError, BrokenPipeError):
            return "reset before an answer"
    return status


def _gone(port: int, sent: bytes, reset: bool) -> None:
    """`sent` on a new connection, then the client gone: closed (FIN), or reset (RST, SO_LINGER 0)."""
    with socket.create_connection(("127.0.0.1", port), timeout=RAW_S) as sock:
        sock.sendall(sent)
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _pipelined(port: int, request: bytes, count: int) -> list[str]:
    """The statuses of the answers to `count` copies of `request` sent in one write, in order; what became of the
    connection in place of those missing."""
    received, statuses = b"", list[str]()
    with socket.create_connection(("127.0.0.1", port), timeout=RAW_S) as sock:
        sock.sendall(request * count)
        while len(statuses) < count:
            while (answer := _split_answer(received)) is not None:
                status, received = answer
                statuses.append(status)
            if len(statuses) == count:
                break
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return [*statuses, f"no answer in {RAW_S:g} s"]
            if not chunk:
                return [*statuses, "closed before an answer"]
            received += chunk
    return statuses


def _split_answer(received: bytes) -> tuple[str, bytes] | None:
    """The first whole answer's status in `received` (framed by its Content-Length) and what follows it, or None."""
    end = received.find(b"\r\n\r\n")
    if end < 0:
        return None
    head, rest = received[:end].split(b"\r\n"), received[end + 4 :]
    lengths = [int(line.split(b":", 1)[1]) for line in head[1:] if line.lower().startswith(b"content-length:")]
    length = lengths[0] if lengths else 0
    return (head[0].split(b" ")[1].decode(), rest[length:]) if len(rest) >= length else None


def tracebacks(log: str) -> list[str]:
    """Each traceback in a log: the line before it (the message logged with it) and its exception's line."""
    lines, found = log.splitlines(), []
    for at, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            end = next((i for i in range(at + 1, len(lines)) if lines[i] and not lines[i].startswith(" ")), len(lines) - 1)
            found.append(f"{lines[at - 1] if at else ''} ... {lines[end]}")
    return found


def _first_answer(received: bytes) -> str | None:
    """The status of the first whole non-interim answer in `received`, or None while it is not all there."""
    while (answer := _split_answer(received)) is not None:
        status, received = answer
        if status != "100":
            return status
    return None


def _zipped(name: str, data: bytes, compression: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="per kind (default: 300)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--serve", default="", help="more `migserve serve` flags, comma-separated: --serve=--frontends=2")
    parser.add_argument("--repo", type=Path, default=ROOT / "results" / "bench_repo")
    parser.add_argument("--revision", help="serve the service as this git revision had it (a worktree), e.g. to see a fix's bugs")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    if unknown := sorted(set(kinds) - set(KINDS)):
        parser.error(f"unknown kinds {unknown}; the kinds are {', '.join(KINDS)}")
    export(args.repo, *MODELS)
    grpc_port = free_port()
    shm = Path("/dev/shm/fuzz")
    shm.write_bytes(bytes(REGION_BYTES))  # a real object for the shared memory registrations and requests to name
    server = Server(
        args.repo,
        *(
            "--models",
            *MODELS,
            "--grpc-port",
            str(grpc_port),
            "--log-level",
            "error",
            "--receive-timeout-s",
            "2",
            *filter(None, args.serve.split(",")),
        ),
        revision=args.revision,
        log=(log := args.repo.parent / "fuzz-serve.log"),
    )
    try:
        fuzzer = Fuzzer(args.repo, server, grpc_port, args.seed)
        fuzzer.register_region()
        send = {kind: getattr(fuzzer, kind.replace("-", "_")) for kind in kinds}
        for number in range(args.requests):
            for kind in kinds:
                send[kind]()
            if number % 50 == 0:
                fuzzer.still_serves()
                fuzzer.register_region()
            if number % 100 == 99:
                print(f"  {number + 1} of each kind, {len(fuzzer.tally.failures)} failures", flush=True)
        fuzzer.still_serves()
        fuzzer.leaks()
    finally:
        server.close()
        shm.unlink(missing_ok=True)
    for error in tracebacks(log.read_text(errors="replace")):
        fuzzer.tally.record("gateway log", "traceback", True, functools.partial(str, error))
    print("\n| kind | answers by status |\n| --- | --- |")
    for kind in [*kinds, "health", "leaks", "gateway log"]:
        answers = sorted((outcome, n) for (k, outcome), n in fuzzer.tally.answers.items() if k == kind)
        print(f"| {kind} | {', '.join(f'{outcome}: {n}' for outcome, n in answers) or 'none'} |")
    for failure in fuzzer.tally.failures:
        print(failure)
    print(f"{len(fuzzer.tally.failures)} failures")
    return 1 if fuzzer.tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
