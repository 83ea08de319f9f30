"""Export one model: build, load weights, export ONNX, check parity, write its directory atomically.

A model directory appears complete or not at all: everything is written into a
hidden temporary directory beside it and renamed into place last.
"""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx
import torch

import migserve
from migserve.contract import CONFIG_FILE, MODEL_FILE, Contract, Provenance, sha256_file, write_contract
from migserve.interrupts import signals_deferred

from . import zoo
from .checkpoint import LoadedCheckpoint, load_checkpoint
from .errors import BadOption, OutputError
from .leftovers import held
from .memory import estimate as estimate_memory
from .onnx_export import export_onnx, to_fp16
from .parity import FP16_TOLERANCE, check_parity
from .request import ExportRequest, ExportResult
from .triton import PYTHON_MODEL, TritonBackend, label_files, render_config
from .zoo.base import OptionError

logger = logging.getLogger(__name__)
Progress = Callable[[str], None]
VERSIONED = ("torch", "onnx", "onnxscript", "onnxruntime", "numpy")


def export_model(req: ExportRequest, progress: Progress = lambda _: None) -> ExportResult:
    started = time.perf_counter()
    mdef = zoo.get(req.name)
    try:
        cfg = mdef.configure(req.size, req.options)
    except OptionError as exc:
        raise BadOption(str(exc)) from None
    progress("building")
    torch.manual_seed(req.seed)
    module = mdef.build(cfg).eval()
    loaded = load_checkpoint(module, req.checkpoint, req.strict) if req.checkpoint else None
    inputs, outputs = mdef.inputs(cfg), mdef.outputs(cfg)
    progress("exporting")
    proto = export_onnx(module, mdef.example(cfg, req.seed), inputs, outputs, mdef.dims(cfg), opset=req.opset)
    if req.fp16:
        proto = to_fp16(proto)
    progress("checking parity")
    tolerance = FP16_TOLERANCE if req.fp16 else mdef.tolerance
    parity = check_parity(module, proto, mdef.samples(cfg, req.seed), outputs, tolerance)
    parameters = sum(p.numel() for p in module.parameters())
    memory = estimate_memory(proto, mdef.dims(cfg))

    def contract(model_sha256: str) -> Contract:
        return Contract(
            name=mdef.name,
            family=mdef.family,
            variant=mdef.variant,
            size=req.size,
            description=mdef.description,
            inputs=inputs,
            outputs=outputs,
            dims=mdef.dims(cfg),
            batching=mdef.batching(cfg),
            preprocessing=mdef.preprocessing(cfg),
            postprocessing=mdef.postprocessing(cfg),
            provenance=_provenance(req, loaded, proto),
            parity=parity,
            parameters=parameters,
            model_sha256=model_sha256,
            memory=memory,
        )

    progress("writing")
    path = write_model_dir(req.out, mdef.name, proto, contract, mdef.extra_files(cfg), triton_backend=req.triton_backend)
    return ExportResult(
        name=mdef.name,
        path=path,
        parameters=parameters,
        onnx_bytes=(path / MODEL_FILE).stat().st_size,
        seconds=time.perf_counter() - started,
        parity_error=parity.worst,
        weights="checkpoint" if loaded else f"random-init seed {req.seed}",
    )


def write_model_dir(
    out: Path,
    name: str,
    proto: onnx.ModelProto,
    contract: Callable[[str], Contract],
    extra: Mapping[str, bytes],
    *,
    triton_backend: TritonBackend = "onnxruntime",
) -> Path:
    """Write model.onnx, contract.json, config.pbtxt and extras into `out/name`, all or nothing."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out))
    except OSError as exc:
        raise OutputError(f"cannot write to {out}: {exc.strerror or exc}") from None
    try:
        with held(tmp):  # until the folder is in place and the one it replaces removed: leftovers.py
            (tmp / MODEL_FILE).parent.mkdir(parents=True)
            onnx.save(proto, str(tmp / MODEL_FILE))
            written = contract(sha256_file(tmp / MODEL_FILE))
            write_contract(tmp, written)
            (tmp / CONFIG_FILE).write_text(render_config(written, triton_backend))
            for filename, data in label_files(written).items():
                (tmp / filename).write_bytes(data)
            if triton_backend == "python":
                (tmp / MODEL_FILE).with_name("model.py").write_text(PYTHON_MODEL.read_text())
            for filename, data in extra.items():
                (tmp / filename).write_bytes(data)
            tmp.chmod(0o755)
            return _replace(tmp, out / name)
    except OSError as exc:
        raise OutputError(f"cannot write {out / name}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace(tmp: Path, final: Path) -> Path:
    """Move the finished folder into place. Between moving an earlier export aside and this one in, the model has no
    folder: Ctrl-C and SIGTERM wait until both are done and the earlier one removed. A SIGKILL between them leaves the
    earlier one aside as `.NAME.KEY.old`, beside `tmp` (`.NAME.KEY.tmp`), for the next export to put back."""
    if final.exists():
        old = tmp.with_suffix(".old")
        with signals_deferred(signal.SIGINT, signal.SIGTERM):
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    return final


def _provenance(req: ExportRequest, loaded: LoadedCheckpoint | None, proto: onnx.ModelProto) -> Provenance:
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    common: dict[str, Any] = {
        "exporter": f"migserve {migserve.__version__}",
        "versions": {name: metadata.version(name) for name in VERSIONED},
        "opset": opset,
        "fp16": req.fp16,
        "seed": req.seed,
    }
    if loaded is None:
        return Provenance(weights="random-init", **common)
    return Provenance(
        weights="checkpoint",
        checkpoint_sha256=loaded.sha256,
        checkpoint_name=loaded.path.name,
        keys_not_in_checkpoint=loaded.missing,
        **common,
    )
