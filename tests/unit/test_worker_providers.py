"""What a worker reports it runs on: the sessions' own providers, and on a GPU partition without CUDA, why.

onnxruntime-gpu is not installed on these machines, so its two GPU outcomes are played by a stand-in module that
offers CUDAExecutionProvider; the CPU-only outcome is the real onnxruntime (see also the gateway test with a
declared GPU partition).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import SimpleNamespace

import onnxruntime

from service.workers.process import _session_options, used_providers
from service.workers.protocol import WorkerSpec

GPU_SPEC = WorkerSpec(partition="gpu-0", device="GPU-5d9f1e7a-0000-4000-8000-000000000000", cores=(), models=())
CPU_SPEC = WorkerSpec(partition="cpu-0", device=None, cores=(0,), models=())


def _session(*providers: str) -> SimpleNamespace:
    return SimpleNamespace(get_providers=lambda: list(providers))


def _cuda_onnxruntime(root: Path, provider_library: bytes | None) -> SimpleNamespace:
    """An onnxruntime-gpu layout whose CUDA provider library is `provider_library` (None: absent)."""
    (root / "capi").mkdir()
    if provider_library is not None:
        (root / "capi" / "libonnxruntime_providers_cuda.so").write_bytes(provider_library)
    return SimpleNamespace(
        __version__="1.31.1",
        __file__=str(root / "__init__.py"),
        get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )


def test_a_cpu_slice_reports_its_sessions_providers_without_a_warning() -> None:
    assert used_providers(onnxruntime, CPU_SPEC, {"m": _session("CPUExecutionProvider")}) == (("CPUExecutionProvider",), None)


def test_cpu_onnxruntime_on_a_gpu_partition_names_the_package_to_install() -> None:
    providers, warning = used_providers(onnxruntime, GPU_SPEC, {"m": _session("CPUExecutionProvider")})
    assert providers == ("CPUExecutionProvider",)
    assert warning is not None and warning.startswith(f"partition gpu-0 ({GPU_SPEC.device}) runs its models on the CPU")
    assert f"this onnxruntime ({onnxruntime.__version__}) has no CUDAExecutionProvider" in warning
    assert "pip install 'migserve[gpu]'" in warning


def test_a_cuda_provider_that_does_not_load_is_explained_by_the_loader(tmp_path: Path) -> None:
    # onnxruntime lists CUDAExecutionProvider, then drops it when its library cannot load: the loader's message says why.
    ort = _cuda_onnxruntime(tmp_path, b"not an ELF file")
    providers, warning = used_providers(ort, GPU_SPEC, {"a": _session("CPUExecutionProvider")})
    assert providers == ("CPUExecutionProvider",)
    assert warning is not None and "offers CUDAExecutionProvider but could not start it" in warning
    assert "libonnxruntime_providers_cuda.so" in warning and "library path" in warning


def test_sessions_on_cuda_need_no_warning_and_list_each_provider_once(tmp_path: Path) -> None:
    ort = _cuda_onnxruntime(tmp_path, None)
    both = ("CUDAExecutionProvider", "CPUExecutionProvider")
    sessions = {"a": _session(*both), "b": _session(*both)}
    assert used_providers(ort, GPU_SPEC, sessions) == (("CUDAExecutionProvider", "CPUExecutionProvider"), None)


def test_every_worker_sets_its_session_thread_counts(tmp_path: Path) -> None:
    # Left to its default, onnxruntime pins a pool thread to each core of the machine whatever the process's mask
    # (tests/integration/test_gateway_behaviour.py sees it); so every kind of worker sets the count itself.
    cuda = SimpleNamespace(
        SessionOptions=onnxruntime.SessionOptions, get_available_providers=_cuda_onnxruntime(tmp_path, None).get_available_providers
    )
    cases = [(onnxruntime, CPU_SPEC, 1), (cuda, GPU_SPEC, 1), (onnxruntime, GPU_SPEC, len(os.sched_getaffinity(0)))]
    for ort, spec, threads in cases:
        options = _session_options(ort, spec)
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (threads, 1), spec.partition
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    two_cores = dataclasses.replace(CPU_SPEC, cores=(0, 1))
    assert _session_options(onnxruntime, two_cores).intra_op_num_threads == 2
