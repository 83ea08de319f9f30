"""The family endpoints: files people have in, answers they want out.

Decoding and pre/post-processing run in threads (`asyncio.to_thread`) so the
event loop keeps serving; inference goes through `Gateway.run`, so it is
batched with other requests and spread over the partitions hosting the model.
Which model serves an endpoint is found from the contracts (family, variant).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from migserve.contract import (
    Contract,
    DensityPostprocessing,
    FacePostprocessing,
    GroundingPostprocessing,
    GroundingPreprocessing,
    ImageOutPostprocessing,
    ImagePreprocessing,
    ThermalPreprocessing,
    VolumePreprocessing,
)
from migserve.types import Array

from ..config import MB
from ..errors import NotFound, NotReady, ServiceError, Unprocessable
from ..families import crowd, face, frontalize, grounding, lns, media
from ..families.volume import Volume, read_volume
from ..jobs import Answer, Job, Keepable, Plan, Progress
from ..repository import ModelEntry
from .budget import Hold
from .limits import HOLD
from .schemas import (
    CrowdOptions,
    CrowdResult,
    FaceOptions,
    FaceResult,
    FrontalizeOptions,
    FrontalizeResult,
    GroundingOptions,
    GroundingResult,
    ImageSize,
    JobView,
    LnsOptions,
    LnsResult,
    ModelList,
    Responses,
    error_responses,
    request_body,
)
from .uploads import options, read_upload, require_file

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .gateway import Gateway

OptionsT = TypeVar("OptionsT", bound=BaseModel)
IMAGE_TYPES = ["image/jpeg", "image/png"]
VOLUME_TYPES = ["application/gzip", "application/zip", "application/dicom", "application/octet-stream"]
MAX_JOB_WAIT_S = 60.0  # GET /v1/jobs/ID?wait_s=: the longest a poll is held (under proxies' usual 60-100 s idle timeouts)
INFER_ERRORS = error_responses(404, 413, 415, 422, 503, 504)
# What an image endpoint holds at its peak for each pixel of the image, counted in --max-pending-mb with the request's
# body from the image's header on (bench/image_memory.py measures it): the decoder's copies, and for crowd counting the
# normalised float32 tiles with their temporaries and the heatmap.
IMAGE_BYTES_PER_PIXEL = {"crowd": 32, "face": 16, "frontalize": 8}


@cache
def _vocabulary(directory: Path, pre: GroundingPreprocessing) -> grounding.Vocabulary:
    return grounding.Vocabulary(directory / pre.vocabulary_file, pre)


@dataclass(frozen=True)
class CtJob:
    """A CT volume read and planned: both stages' tiles, the tiles it runs at once and the memory it holds then."""

    volume: Volume
    organs: Contract
    stations: Contract
    total: int
    in_flight: int
    nbytes: int

    def plan(self, run: lns.Run) -> Plan[Answer]:
        async def work(progress: Progress) -> Answer:
            found = await lns.stations_of(self.volume, self.organs, self.stations, run=run, progress=progress, in_flight=self.in_flight)
            # what the job's URL answers, taken now: the models may be unloaded, or another gateway answer it (--jobs-dir)
            models = {"models": [self.organs.name, self.stations.name], "weights": self.stations.provenance.weights}
            return Answer(models | {"summary": found.summary}, found.nifti)

        return Plan(self.total, work, self.nbytes)


class FamilyEndpoints:
    """The handlers, each a few steps: read the upload, find the model, pre-process, run, post-process."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.config = gateway.config

    def model(self, family: str, variant: str | None = None) -> ModelEntry:
        found = [e for e in self.gateway.models.values() if e.contract.family == family and variant in (None, e.contract.variant)]
        if not found:
            served = sorted(e.contract.variant for e in self.gateway.models.values() if e.contract.family == family)
            if variant is not None and served:
                raise Unprocessable(f"variant {variant!r} is not served; served {family} variants: {', '.join(served)}")
            raise NotFound(f"no {family} model is served by this gateway")
        return found[0]

    def deadline(self, request: Request) -> float:
        return time.monotonic() + self.gateway.timeout(request.headers.get("x-timeout-ms"))

    async def image_upload(
        self, request: Request, model: type[OptionsT], family: str, mode: str = "RGB"
    ) -> tuple[OptionsT, ModelEntry, Array]:
        """The options, the family's model, and the decoded image of an image endpoint's request."""
        upload = await read_upload(request, "image", self.config.max_json_bytes)
        opts = options(model, upload)
        entry = self.model(family)
        data, hold = require_file(upload, "image"), request.scope[HOLD]
        per_pixel, limit = IMAGE_BYTES_PER_PIXEL[family], self.config.max_image_pixels

        def charge(pixels: int) -> None:  # what the endpoint will hold for them, counted with the body (503 past the budget)
            hold.add(pixels * per_pixel)

        pixels = await asyncio.to_thread(media.decode_image, data, field="image", max_pixels=limit, mode=mode, charge=charge)
        return opts, entry, pixels

    async def run_one(self, entry: ModelEntry, tensor: Array, request: Request) -> dict[str, Array]:
        """A single-input model's outputs for `tensor`, through the batcher."""
        return await self.gateway.run(entry.contract.name, {entry.contract.inputs[0].name: tensor}, self.deadline(request))

    async def face(self, request: Request) -> FaceResult:
        opts, entry, rgb = await self.image_upload(request, FaceOptions, "face")
        pre, post = _typed(entry, ImagePreprocessing, FacePostprocessing)
        boxes = [face.whole_image(rgb)]
        if opts.detect:
            boxes = (await asyncio.to_thread(face.detect, rgb, face.DetectionSettings()))[: opts.max_faces]
        faces: list[dict[str, Any]] = []
        if boxes:
            batch, crops = await asyncio.to_thread(face.preprocess, rgb, boxes, pre, not opts.detect)
            faces = face.describe(await self.run_one(entry, batch, request), post, boxes, crops, opts.embedding)
        height, width = rgb.shape[:2]
        return FaceResult.model_validate(
            {"model": entry.contract.name, "weights": entry.contract.provenance.weights, "image": {"width": width, "height": height}}
            | {"detected": opts.detect, "faces": faces}
        )

    async def frontalize(self, request: Request) -> Response:
        opts, entry, gray = await self.image_upload(request, FrontalizeOptions, "frontalize", mode="L")
        pre, post = _typed(entry, ThermalPreprocessing, ImageOutPostprocessing)
        outputs = await self.run_one(entry, frontalize.preprocess(gray, pre), request)
        pixels = frontalize.to_pixels(outputs[entry.contract.outputs[0].name][0], post)
        png = await asyncio.to_thread(media.encode_png, pixels)
        if opts.format == "png":
            return Response(png, media_type="image/png", headers={"X-Migserve-Weights": entry.contract.provenance.weights})
        result = FrontalizeResult(
            model=entry.contract.name,
            weights=entry.contract.provenance.weights,
            width=pixels.shape[1],
            height=pixels.shape[0],
            png=media.to_base64(png),
        )
        return JSONResponse(result.model_dump())

    async def grounding(self, request: Request) -> GroundingResult:
        upload = await read_upload(request, "features", self.config.max_json_bytes)
        opts = options(GroundingOptions, upload)
        entry = self.model("grounding", opts.variant)
        pre, post = _typed(entry, GroundingPreprocessing, GroundingPostprocessing)
        if upload.inline is not None:
            features = grounding.features_from_list(upload.inline, pre)
        else:
            features = await asyncio.to_thread(grounding.load_features, require_file(upload, "features"), pre)
        words, word_mask, unknown = _vocabulary(entry.directory, pre).encode(opts.sentence, entry.contract.dims["words"])
        video, video_mask, real = grounding.frames(features, pre, entry.contract.dims["frames"])
        inputs = {"video": video, "video_mask": video_mask, "words": words, "word_mask": word_mask}
        outputs = await self.gateway.run(entry.contract.name, inputs, self.deadline(request))
        found = grounding.moments(outputs, real, opts.duration, post, opts.top_k or post.default_top_k)
        tokens = _vocabulary(entry.directory, pre).pattern.findall(opts.sentence.lower() if pre.lowercase else opts.sentence)
        return GroundingResult.model_validate(
            {"model": entry.contract.name, "weights": entry.contract.provenance.weights, "variant": entry.contract.variant}
            | {"duration": opts.duration, "frames": real, "words": tokens[: pre.max_words], "unknown_words": unknown}
            | {"moments": [m.__dict__ for m in found]}
        )

    async def crowd(self, request: Request) -> CrowdResult:
        opts, entry, rgb = await self.image_upload(request, CrowdOptions, "crowd")
        pre, post = _typed(entry, ImagePreprocessing, DensityPostprocessing)
        dims = entry.contract.dims
        batch, tiling = await asyncio.to_thread(crowd.tiles, rgb, pre, dims["height"], dims["width"])
        outputs = await self.run_one(entry, batch, request)
        density = np.clip(crowd.stitch(outputs[entry.contract.outputs[0].name], tiling, post), 0, None)
        height, width = rgb.shape[:2]
        png = await asyncio.to_thread(lambda: media.encode_png(crowd.heatmap(density, height, width))) if opts.density else None
        return CrowdResult(
            model=entry.contract.name,
            weights=entry.contract.provenance.weights,
            image=ImageSize(width=width, height=height),
            count=round(float(density.sum()), 3),
            tiles=len(batch),
            density_shape=list(density.shape),
            density_png=media.to_base64(png) if png is not None else None,
        )

    def lns_models(self) -> tuple[ModelEntry, ModelEntry]:
        """Stage 1 takes CT alone; stage 2 takes CT plus organ masks (extra channels)."""
        entries = [e for e in self.gateway.models.values() if e.contract.family == "lns"]
        first = [
            e for e in entries if isinstance(e.contract.preprocessing, VolumePreprocessing) and not e.contract.preprocessing.extra_channels
        ]
        second = [e for e in entries if e not in first]
        if not first or not second:
            raise NotFound("lymph node station parsing needs both lns-organs and lns-stations served by this gateway")
        return first[0], second[0]

    async def ct_job(self, data: bytes, hold: Hold) -> CtJob:
        """The CT job of the volume in `data`, what it unpacks to counted in `hold` as it is read."""
        organs, stations = self.lns_models()
        config = self.config
        volume = await asyncio.to_thread(
            lambda: read_volume(data, max_bytes=config.max_body_bytes * 4, max_voxels=config.max_volume_voxels, unpacking=hold.add)
        )
        resampled, total = lns.plan(volume, organs.contract, stations.contract, self.config.max_volume_voxels)
        in_flight, nbytes = self.tiles_that_fit(volume.hu.shape, resampled, organs.contract, stations.contract)
        if in_flight < self.config.tiles_in_flight:
            logger.info(
                "a CT job runs %d tiles at once, not --tiles-in-flight %d: the running CT jobs would pass --max-job-mb %g",
                in_flight,
                self.config.tiles_in_flight,
                self.config.max_job_bytes / MB,
            )
        return CtJob(volume, organs.contract, stations.contract, total, in_flight, nbytes)

    def runner(self, deadline: float) -> lns.Run:
        async def run(name: str, inputs: dict[str, Array]) -> dict[str, Array]:
            return await self.gateway.run(name, inputs, deadline)

        return run

    async def resume_lns(self, read: Callable[[], bytes], progress: Progress) -> Plan[Answer]:
        """A CT job the last gateway on --jobs-dir left running, from its upload (JobStore.resume_pending): read with
        its bytes counted in --max-pending-mb as a request's are, and given --job-timeout-s from now. With explicit
        model control, once its models are loaded (within --job-timeout-s)."""
        await self.lns_loaded(progress)
        upload = await asyncio.to_thread(read)
        with Hold(self.gateway.bodies) as hold:
            hold.add(len(upload))
            ct = await self.ct_job(upload, hold)
        return ct.plan(self.runner(time.monotonic() + self.config.job_timeout_s))

    async def lns_loaded(self, progress: Progress) -> None:
        """With --model-control-mode explicit, until both CT models are served (a load, POST
        /v2/repository/models/NAME/load) or --job-timeout-s has passed; the job's stage says what it waits for."""
        if self.config.model_control_mode != "explicit":
            return
        deadline = time.monotonic() + self.config.job_timeout_s
        async with self.gateway.loaded:
            while not self.lns_served() and (left := deadline - time.monotonic()) > 0:
                progress.stage = "waiting for lns-organs and lns-stations to be loaded (POST /v2/repository/models/NAME/load)"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.gateway.loaded.wait(), left)

    def lns_served(self) -> bool:
        try:
            self.lns_models()
        except NotFound:
            return False
        return True

    async def lns(self, request: Request) -> Response:
        upload = await read_upload(request, "volume", self.config.max_json_bytes)
        opts = options(LnsOptions, upload)
        data = require_file(upload, "volume")
        ct = await self.ct_job(data, request.scope[HOLD])  # what the volume unpacks to is counted with its body
        as_job = opts.mode == "job" or (opts.mode == "auto" and ct.total > self.config.job_min_tiles)
        deadline = time.monotonic() + self.config.job_timeout_s if as_job else self.deadline(request)
        plan = ct.plan(self.runner(deadline))
        if as_job:  # kept with its upload in --jobs-dir: a gateway started again runs it again
            job = await self.gateway.jobs.submit_kept("lns-segment", plan.total, plan.work, plan.nbytes, data)
            url = f"/v1/jobs/{job.id}"
            return JSONResponse(self.job_view(job).model_dump(), status_code=202, headers={"Location": url})
        job = self.gateway.jobs.submit("lns-segment", plan.total, plan.work, plan.nbytes)
        try:
            await self.gateway.jobs.wait(job)
        except asyncio.CancelledError:  # the client hung up: nobody will ask for this synchronous answer
            self.gateway.jobs.cancel(job, "cancelled: the client disconnected before the answer")
            raise
        result = cast(Keepable, job.result)  # a finished lns job's: an Answer, or its label map in --jobs-dir
        nifti = await asyncio.to_thread(result.payload) if opts.inline else None
        return JSONResponse(self.lns_result(job, nifti).model_dump())

    def tiles_that_fit(
        self, shape: tuple[int, ...], resampled: tuple[int, int, int], organs: Contract, stations: Contract
    ) -> tuple[int, int]:
        """The most tiles up to --tiles-in-flight a CT job may have outstanding with the running jobs' memory and its own
        within --max-job-mb, and what it holds then; where not even one tile fits, one (the job store refuses it). Where
        a CT model has a Triton replica, its tiles' logits may come read-only, and each blend copies them."""
        room = self.config.max_job_bytes - self.gateway.jobs.reserved()
        volume = (shape[0], shape[1], shape[2])
        replicas = [r for c in (organs, stations) for r in self.gateway.backend.replicas(c.name)]
        read_only = any(r.read_only_outputs for r in replicas)
        for in_flight in range(self.config.tiles_in_flight, 0, -1):
            nbytes = lns.job_bytes(volume, resampled, organs, stations, in_flight, read_only=read_only)
            if nbytes <= room or in_flight == 1:
                break
        return in_flight, nbytes

    def lns_result(self, job: Job[Any], nifti: bytes | None) -> LnsResult:
        """A finished lns job's answer, with its label map inline where `nifti` is given."""
        answer = cast(Keepable, job.result).summary  # models, weights and the stations' summary
        return LnsResult.model_validate(
            answer
            | {"job_id": job.id, "label_map_url": f"/v1/jobs/{job.id}/labels.nii.gz"}
            | {"label_map_base64": media.to_base64(nifti) if nifti is not None else None}
        )

    def job_view(self, job: Job[Any]) -> JobView:
        view = job.view() | {"status_url": f"/v1/jobs/{job.id}"}
        if job.result is not None:
            view["result"] = self.lns_result(job, None)
        return JobView.model_validate(view)

    async def label_map(self, job_id: str) -> Response:
        job = self.gateway.jobs.get(job_id)
        if job.error is not None:
            raise Unprocessable(f"job {job_id} failed: {job.error}")
        if job.result is None:
            raise NotReady(f"job {job_id} is still running ({job.progress.done}/{job.progress.total} tiles)")
        headers = {"Content-Disposition": f'attachment; filename="{job_id}-stations.nii.gz"'}
        nifti = await asyncio.to_thread(cast(Keepable, job.result).payload)
        return Response(nifti, media_type="application/gzip", headers=headers)

    def models_view(self) -> ModelList:
        models = []
        for name, entry in sorted(self.gateway.models.items()):
            contract = entry.contract
            partitions = sorted(pid for pid, placed in self.gateway.placement.items() if name in placed)
            models.append(
                {"name": name, "family": contract.family, "variant": contract.variant, "size": contract.size}
                | {"description": contract.description, "weights": contract.provenance.weights}
                | {"provenance": contract.provenance.model_dump(), "ready": self.gateway.model_ready(name), "partitions": partitions}
                | {"contract": contract.model_dump(mode="json")}
            )
        return ModelList.model_validate({"models": models})


def _typed(entry: ModelEntry, pre_type: type[Any], post_type: type[Any]) -> tuple[Any, Any]:
    contract = entry.contract
    if not isinstance(contract.preprocessing, pre_type) or not isinstance(contract.postprocessing, post_type):
        raise ServiceError(f"{contract.name}: its contract's processing is not {pre_type.__name__} / {post_type.__name__}")
    return contract.preprocessing, contract.postprocessing


def _with(extra: Responses, errors: Responses) -> Responses:
    return {**extra, **errors}


@dataclass(frozen=True)
class EndpointDoc:
    """How one family endpoint is documented: its options, its file, and its answer."""

    path: str
    summary: str
    options: type[BaseModel]
    file_field: str
    file_help: str
    media_types: list[str]
    answer: type[BaseModel]
    extra: Responses


IMAGE = "a JPEG or PNG image"
PNG_ANSWER: Responses = {200: {"content": {"image/png": {}}, "model": FrontalizeResult, "description": "PNG, or JSON with format=json"}}
UPLOADS = {
    "face": EndpointDoc(
        "/v1/face/analyze",
        "Faces in a photo: box, 40 attributes, expression, 68 landmarks (face-pros)",
        FaceOptions,
        "image",
        IMAGE,
        IMAGE_TYPES,
        FaceResult,
        {},
    ),
    "frontalize": EndpointDoc(
        "/v1/frontalize",
        "A thermal face in, the visible frontal face out (frontalize-dalgan)",
        FrontalizeOptions,
        "image",
        "a thermal face, JPEG or PNG",
        IMAGE_TYPES,
        FrontalizeResult,
        PNG_ANSWER,
    ),
    "grounding": EndpointDoc(
        "/v1/grounding",
        "Moments of a video that match a sentence, in seconds (grounding-*)",
        GroundingOptions,
        "features",
        "clip features, a .npy array [T, D]",
        ["application/x-npy"],
        GroundingResult,
        {},
    ),
    "lns": EndpointDoc(
        "/v1/lns/segment",
        "Lymph node stations in a CT volume (lns-organs then lns-stations)",
        LnsOptions,
        "volume",
        "NIfTI (.nii, .nii.gz), a zip of a DICOM series, or one DICOM file",
        VOLUME_TYPES,
        LnsResult,
        _with({202: {"model": JobView, "description": "a job: poll status_url"}}, error_responses(410)),
    ),
    "crowd": EndpointDoc(
        "/v1/crowd/count",
        "People in an image of any size, and the density heatmap (crowd-csrnet)",
        CrowdOptions,
        "image",
        IMAGE,
        IMAGE_TYPES,
        CrowdResult,
        {},
    ),
}


def register_v1(app: FastAPI, gateway: Gateway) -> None:
    endpoints = FamilyEndpoints(gateway)
    gateway.jobs.resumer("lns-segment", endpoints.resume_lns)
    for name, spec in UPLOADS.items():
        app.post(
            spec.path,
            response_model=None if spec.extra.get(200) else spec.answer,
            responses=_with(spec.extra, INFER_ERRORS),
            summary=spec.summary,
            openapi_extra=request_body(spec.options, spec.file_field, spec.file_help, spec.media_types),
        )(getattr(endpoints, name))

    @app.get("/v1/jobs/{job_id}", response_model=JobView, responses=error_responses(404), summary="A job's state, progress and result")
    async def job(
        job_id: str,
        wait_s: float = Query(0.0, ge=0, le=MAX_JOB_WAIT_S, description="answer as soon as the job ends, or after this long"),
    ) -> JobView:
        return endpoints.job_view(await gateway.jobs.ended(job_id, wait_s))

    @app.delete(
        "/v1/jobs/{job_id}",
        status_code=204,
        response_class=Response,
        responses=error_responses(404),
        summary="Delete a job and its result; one still running is cancelled first",
    )
    async def delete_job(job_id: str) -> Response:
        await gateway.jobs.delete(job_id)
        return Response(status_code=204)

    @app.get(
        "/v1/jobs/{job_id}/labels.nii.gz",
        responses=_with({200: {"content": {"application/gzip": {}}, "description": "station label map"}}, error_responses(404, 409, 422)),
        summary="A finished segmentation job's label map",
    )
    async def label_map(job_id: str) -> Response:
        return await endpoints.label_map(job_id)

    @app.get("/v1/models", response_model=ModelList, summary="Every served model: family, variant, provenance, contract")
    async def models() -> ModelList:
        return endpoints.models_view()
