"""Pydantic models of the /v1 endpoints: the options each takes and the answers it gives.

They validate options and document every request and response in the OpenAPI
description (`/docs`); `request_body` writes the three ways to send a file.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# --- options -------------------------------------------------------------------------


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a duration of "inf" answered 200 with null moments


class FaceOptions(_Options):
    detect: bool = Field(True, description="find faces with OpenCV's Haar cascade; false treats the image as one aligned face")
    embedding: bool = Field(False, description="include each face's embedding")
    max_faces: int = Field(20, ge=1, le=100, description="largest faces analysed at most")


class FrontalizeOptions(_Options):
    format: Literal["png", "json"] = Field("png", description="png: the image as the body; json: base64 PNG in JSON")


class GroundingOptions(_Options):
    sentence: str = Field(min_length=1, max_length=2000, description="the query, in English", examples=["person turn a light on"])
    duration: float = Field(gt=0, description="video length in seconds; moments fall in [0, duration]", examples=[30.4])
    variant: str = Field("mgsl", description="mgsl, ssrn, ecrl, dscnet or mhst (served as grounding-<variant>)")
    top_k: int | None = Field(None, ge=1, le=100, description="moments returned at most (default: the contract's)")


class LnsOptions(_Options):
    mode: Literal["auto", "sync", "job"] = Field("auto", description="auto: a job (202) when the volume needs many tiles")
    inline: bool = Field(False, description="include the label map as base64 .nii.gz in the JSON")


class CrowdOptions(_Options):
    density: bool = Field(False, description="include the density map as a base64 PNG heatmap at the image's size")


# --- answers ---------------------------------------------------------------------------


class ErrorBody(BaseModel):
    error: str = Field(examples=["image: corrupt JPEG image: image file is truncated"])


class ImageSize(BaseModel):
    width: int
    height: int


class Expression(BaseModel):
    label: str
    probabilities: dict[str, float]


class Face(BaseModel):
    box: list[float] = Field(description="detected face (x, y, width, height) in image pixels")
    crop: list[int] = Field(description="square the model saw (x, y, width, height), the box plus the contract's margin")
    attributes: dict[str, float] = Field(description="probability of each CelebA attribute")
    expression: Expression
    landmarks: list[list[float]] = Field(description="68 (x, y) points in image pixels")
    embedding: list[float] | None = None


class FaceResult(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "face-pros",
                    "weights": "random-init",
                    "image": {"width": 512, "height": 512},
                    "detected": True,
                    "faces": [
                        {
                            "box": [176.0, 66.0, 95.0, 95.0],
                            "crop": [157, 47, 133, 133],
                            "attributes": {"5_o_Clock_Shadow": 0.37, "Arched_Eyebrows": 0.24},
                            "expression": {"label": "Happiness", "probabilities": {"Surprise": 0.1, "Happiness": 0.6}},
                            "landmarks": [[190.2, 101.5], [191.0, 110.3]],
                            "embedding": None,
                        }
                    ],
                }
            ]
        }
    )

    model: str
    weights: str = Field(description="'checkpoint' or 'random-init' (answers are then meaningless)")
    image: ImageSize
    detected: bool = Field(description="false when detect=false: the whole image is one face")
    faces: list[Face]


class FrontalizeResult(BaseModel):
    model: str
    weights: str
    width: int
    height: int
    png: str = Field(description="the visible face, base64 PNG")


class Moment(BaseModel):
    start: float = Field(description="seconds")
    end: float = Field(description="seconds")
    score: float


class GroundingResult(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "grounding-mgsl",
                    "weights": "random-init",
                    "variant": "mgsl",
                    "duration": 30.4,
                    "frames": 76,
                    "words": ["person", "turn", "a", "light", "on"],
                    "unknown_words": [],
                    "moments": [{"start": 12.0, "end": 19.2, "score": 0.81}],
                }
            ]
        }
    )
    model: str
    weights: str
    variant: str
    duration: float
    frames: int = Field(description="feature rows the model read (after pooling to the contract's max_frames)")
    words: list[str]
    unknown_words: list[str] = Field(description="words not in the model's vocabulary (read as <unk>)")
    moments: list[Moment]


class CrowdResult(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "crowd-csrnet",
                    "weights": "checkpoint",
                    "image": {"width": 1024, "height": 768},
                    "count": 312.4,
                    "tiles": 1,
                    "density_shape": [96, 128],
                    "density_png": None,
                }
            ]
        }
    )

    model: str
    weights: str
    image: ImageSize
    count: float = Field(ge=0, description="people in the image: the density map's sum (negative densities clipped)")
    tiles: int
    density_shape: list[int] = Field(description="(height, width) of the density map")
    density_png: str | None = Field(None, description="heatmap of the density at the image's size, base64 PNG")


class Station(BaseModel):
    label: int
    voxels: int
    volume_ml: float


class LnsSummary(BaseModel):
    shape: list[int] = Field(description="input grid (x, y, z) as in the returned NIfTI")
    spacing_mm: list[float]
    source: Literal["nifti", "dicom"]
    stations: dict[str, Station]
    tiles: int


class LnsResult(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "job_id": "3f2b9c0e7d6a4e1f8b5c2a9d0e1f2a3b",
                    "models": ["lns-organs", "lns-stations"],
                    "weights": "random-init",
                    "summary": {
                        "shape": [512, 512, 120],
                        "spacing_mm": [0.78, 0.78, 2.5],
                        "source": "dicom",
                        "stations": {"4R": {"label": 6, "voxels": 2310, "volume_ml": 3.51}},
                        "tiles": 96,
                    },
                    "label_map_url": "/v1/jobs/3f2b9c0e7d6a4e1f8b5c2a9d0e1f2a3b/labels.nii.gz",
                    "label_map_base64": None,
                }
            ]
        }
    )

    job_id: str
    models: list[str]
    weights: str
    summary: LnsSummary
    label_map_url: str = Field(description="GET it for the station label map (.nii.gz, the input's shape and affine)")
    label_map_base64: str | None = None


class JobProgress(BaseModel):
    done: int
    total: int


class JobError(BaseModel):
    status: int
    message: str


class JobView(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "3f2b9c0e7d6a4e1f8b5c2a9d0e1f2a3b",
                    "kind": "lns-segment",
                    "state": "running",
                    "stage": "organs",
                    "progress": {"done": 17, "total": 96},
                    "created": 1795488111.7,
                    "finished": None,
                    "error": None,
                    "resumes": 0,
                    "status_url": "/v1/jobs/3f2b9c0e7d6a4e1f8b5c2a9d0e1f2a3b",
                    "result": None,
                }
            ]
        }
    )

    id: str
    kind: str
    state: Literal["running", "done", "failed"]
    stage: str
    progress: JobProgress
    created: float
    finished: float | None
    error: JobError | None
    resumes: int = Field(
        0, description="times a gateway started again on --jobs-dir ran this job again from its upload (its progress from 0)"
    )
    status_url: str
    result: LnsResult | None = None


class ModelInfo(BaseModel):
    name: str
    family: str
    variant: str
    size: str
    description: str
    weights: str
    provenance: dict[str, Any]
    ready: bool
    partitions: list[str]
    contract: dict[str, Any]


class ModelList(BaseModel):
    models: list[ModelInfo]


# --- OpenAPI helpers -------------------------------------------------------------------

ERRORS = {
    404: "unknown model, variant or job",
    409: "the job has not finished yet",
    410: "the job was deleted (DELETE /v1/jobs/ID) while this request waited for it",
    413: "body, image or volume over the configured limit",
    415: "not a format this endpoint reads",
    422: "unusable content or options; the message names the problem",
    503: "queue full or no ready replica (Retry-After)",
    504: "no answer within the request's deadline (X-Timeout-Ms)",
}


Responses = dict[int | str, dict[str, Any]]


def error_responses(*statuses: int) -> Responses:
    return {s: {"model": ErrorBody, "description": ERRORS[s]} for s in statuses}


def request_body(options: type[BaseModel], file_field: str, file_help: str, raw_types: list[str]) -> dict[str, Any]:
    """openapi_extra for an endpoint that takes one file and options, as multipart, JSON or a raw body."""
    schema = options.model_json_schema()
    props = schema.get("properties", {})
    required = schema.get("required", [])
    binary = {"type": "string", "format": "binary", "description": file_help}
    encoded = {"type": "string", "format": "byte", "description": file_help + " (base64)"}
    content: dict[str, Any] = {
        "multipart/form-data": {
            "schema": {"type": "object", "properties": {file_field: binary, **props}, "required": [file_field, *required]}
        },
        "application/json": {
            "schema": {"type": "object", "properties": {file_field: encoded, **props}, "required": [file_field, *required]}
        },
    }
    for media in raw_types:
        content[media] = {"schema": binary}
    note = "Send the file as a multipart part, base64 in JSON, or as the body itself with the options in the query string."
    return {"requestBody": {"required": True, "description": note, "content": content}}
