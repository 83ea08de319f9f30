"""Write a model's Triton `config.pbtxt` from its contract.

With the python backend, `1/model.py` (a copy of triton_python_model.py) runs the same
`model.onnx` with onnxruntime. Triton's dims omit the batch dim when `max_batch_size > 0`; every other symbolic
dim is -1. Warm-up requests are zeros at the contract's default dims, batch 1. An output whose values are per class (face-pros's
attributes and expression) names a label file beside config.pbtxt, so Triton's classification answers carry labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from migserve.contract import CONFIG_FILE, Contract, TensorSpec

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64"}


def _dims(spec: TensorSpec) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in spec.shape[1:]]


def _warm_dims(spec: TensorSpec, contract: Contract) -> list[int]:
    return [d if isinstance(d, int) else contract.dims[d].default for d in spec.shape[1:]]


def _tensor(spec: TensorSpec, label_file: str | None = None) -> str:
    dims = ", ".join(str(d) for d in _dims(spec))
    labels = f'\n    label_filename: "{label_file}"' if label_file else ""
    return f'  {{\n    name: "{spec.name}"\n    data_type: {TRITON_DTYPES[spec.dtype]}\n    dims: [ {dims} ]{labels}\n  }}'


def label_files(contract: Contract) -> dict[str, bytes]:
    """Each labelled output's classes, a line each (Triton's label_filename): the labels of classification answers."""
    return {label_file(name): "".join(f"{label}\n" for label in labels).encode() for name, labels in contract.class_labels().items()}


def label_file(output: str) -> str:
    return f"{output}_labels.txt"


def _warmup_input(spec: TensorSpec, contract: Contract) -> str:
    # Zeros are valid for every input: token id 0 is padding, and masked-out work stays finite.
    dims = ", ".join(str(d) for d in _warm_dims(spec, contract))
    return (
        f'    inputs {{\n      key: "{spec.name}"\n      value {{\n'
        f"        data_type: {TRITON_DTYPES[spec.dtype]}\n        dims: [ {dims} ]\n        zero_data: true\n      }}\n    }}"
    )


TritonBackend = Literal["onnxruntime", "python"]
PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")


def render_config(contract: Contract, backend: TritonBackend = "onnxruntime", instances: int = 1) -> str:
    """onnxruntime: Triton's ONNX Runtime backend on the GPU. python: the twin (`model.py`) on CPU, for a CPU-only Triton."""
    batching = contract.batching
    engine, kind = ('platform: "onnxruntime_onnx"', "KIND_GPU") if backend == "onnxruntime" else ('backend: "python"', "KIND_CPU")
    preferred = ", ".join(str(b) for b in batching.preferred_batch_sizes)
    warm_inputs = "\n".join(_warmup_input(s, contract) for s in contract.inputs)
    labelled = contract.class_labels()
    parts = [
        f'name: "{contract.name}"',
        engine,
        f"max_batch_size: {batching.max_batch_size}",
        "input [\n" + ",\n".join(_tensor(s) for s in contract.inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor(s, label_file(s.name) if s.name in labelled else None) for s in contract.outputs) + "\n]",
        "dynamic_batching {\n"
        + (f"  preferred_batch_size: [ {preferred} ]\n" if preferred else "")
        + f"  max_queue_delay_microseconds: {batching.max_queue_delay_us}\n}}",
        f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]",
        f'model_warmup [\n  {{\n    name: "{contract.name}-warmup"\n    batch_size: 1\n{warm_inputs}\n  }}\n]',
        f'parameters {{\n  key: "model_sha256"\n  value {{ string_value: "{contract.model_sha256}" }}\n}}',
    ]
    return "\n".join(parts) + "\n"


def config_backend(config: str) -> TritonBackend:
    """Which of the two backends a config.pbtxt runs its model with."""
    return "python" if 'backend: "python"' in config else "onnxruntime"


def switch_backend(model_dir: Path, contract: Contract, backend: TritonBackend) -> bool:
    """Point an exported model's config.pbtxt (and model.py) at `backend`, leaving model.onnx as it is; False where
    it ran on that backend already. Each file is written beside itself and renamed into place."""
    config = model_dir / CONFIG_FILE
    try:
        if config_backend(config.read_text()) == backend:
            return False
    except FileNotFoundError:
        pass
    twin = (model_dir / contract.model_file).with_name("model.py")
    if backend == "python":
        _replace_text(twin, PYTHON_MODEL.read_text())
    else:
        twin.unlink(missing_ok=True)
    _replace_text(config, render_config(contract, backend))
    return True


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
