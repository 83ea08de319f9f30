"""The export CLI's argument handling, and that the runtime side needs no torch."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from exporters.cli import _options, _pairs, format_table, run
from exporters.errors import BadOption, UnknownModel
from exporters.request import ExportResult
from exporters.zoo import ZOO
from tests.helpers import MIGSERVE

ROOT = Path(__file__).resolve().parents[2]
NAMES = list(ZOO)

BLOCK_TORCH = textwrap.dedent(
    """
    import sys
    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "onnxscript"):
                raise ImportError(f"No module named {name!r} (blocked by the test)")
            return None
    sys.meta_path.insert(0, BlockTorch())
    """
)


def test_set_applies_to_a_model_or_a_family_prefix() -> None:
    options = _options(["grounding.feature_dim=500", "face-pros.expression_classes=8"], NAMES)
    assert sorted(options) == ["face-pros", *sorted(n for n in NAMES if n.startswith("grounding-"))]
    assert options["grounding-mhst"] == {"feature_dim": "500"}
    assert options["face-pros"] == {"expression_classes": "8"}


@pytest.mark.parametrize("item", ["feature_dim=500", "grounding.feature_dim", "speech.rate=3"])
def test_bad_set(item: str) -> None:
    with pytest.raises(BadOption, match="--set"):
        _options([item], NAMES)


def test_checkpoint_pairs() -> None:
    assert _pairs(["crowd-csrnet=/x/y.pth"], "--checkpoint", ["crowd-csrnet"]) == {"crowd-csrnet": "/x/y.pth"}
    with pytest.raises(BadOption, match="expected NAME=VALUE"):
        _pairs(["crowd-csrnet"], "--checkpoint", NAMES)
    with pytest.raises(BadOption, match="face-pros is not being exported"):
        _pairs(["face-pros=a.pth"], "--checkpoint", ["crowd-csrnet"])
    with pytest.raises(UnknownModel, match="unknown model 'crowd'"):
        _pairs(["crowd=a.pth"], "--checkpoint", ["crowd-csrnet"])


def test_table_lists_results_and_failures() -> None:
    ok = ExportResult("crowd-csrnet", Path("m"), 16_263_489, 65_100_000, 12.34, 3.1e-6, "random-init seed 0")
    table = format_table([ok], [("face-pros", "boom")]).splitlines()
    assert table[0].split() == ["model", "parameters", "onnx", "MB", "export", "s", "parity", "rel", "err", "weights"]
    assert table[2].split()[:5] == ["crowd-csrnet", "16,263,489", "65.1", "12.3", "3.1e-06"]
    assert table[3].split() == ["face-pros", "-", "-", "-", "-", "FAILED"]


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_service_and_cli_import_without_torch() -> None:
    proc = _python("import service.repository, migserve.contract, migserve.cli\nimport sys\nassert 'torch' not in sys.modules\nprint('ok')")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_export_without_torch_says_how_to_install_it() -> None:
    proc = _python("from migserve.cli import main\nraise SystemExit(main(['export', '--all']))")
    assert proc.returncode == 2
    assert "pip install 'migserve[export]'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model-repo", "/nonexistent"], "model repository /nonexistent does not exist; run: migserve export --all --out /nonexistent"),
        (["--cpu-slices", "a,b"], "--cpu-slices 'a,b': expected cores per slice, comma-separated"),
        (["--cpu-slices", "64,64"], "--cpu-slices 64,64 needs 128 cores"),
        (["--preferred-batch-sizes", "4,0"], "--preferred-batch-sizes '4,0': expected batch sizes of 1 or more, comma-separated"),
        (["--topology", "/nonexistent.yaml"], "cannot read topology /nonexistent.yaml"),
        (["--port", "HELD"], "--port HELD: cannot listen on 127.0.0.1:HELD: Address already in use"),
        (["--grpc-port", "HELD"], "cannot listen on 127.0.0.1:HELD: Address already in use"),
        (["--port", "80000"], "--port 80000: expected a port from 0 to 65535 (0: any free one)"),
        (["--grpc-port", "-1"], "--grpc-port -1: expected a port from 0 to 65535"),
        (["--max-pending-mb", "100"], "error: --max-pending-mb 100 is below --max-body-mb 256: a request of the largest"),
        (["--queue-capacity", "0"], "error: --queue-capacity 0: Input should be greater than or equal to 1"),
        (["--tiles-in-flight", "0"], "error: --tiles-in-flight 0: Input should be greater than or equal to 1"),
        (["--max-job-mb", "0"], "error: --max-job-mb 0: Input should be greater than 0"),
        (["--job-timeout-s", "0"], "error: --job-timeout-s 0: Input should be greater than 0"),
        (["--max-connections", "0"], "error: --max-connections 0: Input should be greater than or equal to 1"),
        (["--arena-keep-mb", "0.5"], "error: --arena-keep-mb 0.5: Input should be greater than or equal to 1"),
        (["--max-queue-delay-ms", "-1"], "error: --max-queue-delay-ms -1: Input should be greater than or equal to 0"),
        (["--cpu-run-slices-cache", ""], "error: --cpu-run-slices-cache '': expected a file's path, or off"),
    ],
)
def test_serve_start_up_errors_are_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "m").mkdir()  # a directory without a contract: refused, so there is nothing to serve
    held = socket.create_server(("127.0.0.1", 0))  # a port another process listens on
    port = str(held.getsockname()[1])
    args, message = [a.replace("HELD", port) for a in args], message.replace("HELD", port)
    argv = ["serve", *(["--model-repo", str(repo)] if "--model-repo" not in args else []), *args]
    argv += ["--port", "0"] if "--port" not in args else []  # not 8000, which something on the host may hold
    with held:
        proc = subprocess.run([MIGSERVE, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ")
    assert "Traceback" not in proc.stderr
    assert message in lines[-1]


def test_every_serve_setting_names_the_flag_that_sets_it() -> None:
    """A refused setting is said by its flag (service/cli.flag_problem): each ServeConfig field has one, by its name
    or in FLAG_OF, but those no flag sets."""
    from migserve.cli import build_parser
    from service.cli import FLAG_OF, NOT_FLAGS, flag_of
    from service.config import ServeConfig

    serve = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "serve")[1]  # type: ignore[union-attr]
    flags = {option for action in serve._actions for option in action.option_strings}
    missing = [(f, flag_of(f)[0]) for f in ServeConfig.model_fields if f not in NOT_FLAGS and flag_of(f)[0] not in flags]
    assert not missing, missing
    assert set(FLAG_OF) <= set(ServeConfig.model_fields)


HIDE_ONNXRUNTIME = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):  # as if onnxruntime were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "onnxruntime":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, Hide())
from migserve.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_serve_without_onnxruntime_says_which_extra_to_install(tmp_path: Path) -> None:
    # onnxruntime comes from the cpu or the gpu extra (never both): a bare install must say so, not fail in a worker.
    run = subprocess.run(
        [sys.executable, "-c", HIDE_ONNXRUNTIME, "serve", "--model-repo", str(tmp_path), "--cpu-slices", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        "error: onnxruntime is not installed, and the local partitions' workers need it: pip install 'migserve[cpu]', "
        "or 'migserve[gpu]' (onnxruntime-gpu) on NVIDIA GPUs, never both"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-body-mb", "inf"], "argument --max-body-mb: expected a finite number, got 'inf'"),
        (["--timeout-s", "nan"], "argument --timeout-s: expected a finite number, got 'nan'"),
        (["--max-volume-mvox=-inf"], "argument --max-volume-mvox: expected a finite number, got '-inf'"),
        (["--max-pending-mb", "lots"], "argument --max-pending-mb: expected a number, got 'lots'"),
        (["--job-timeout-s", "inf"], "argument --job-timeout-s: expected a finite number, got 'inf'"),
    ],
)
def test_serve_refuses_numbers_that_are_not_finite_naming_the_flag(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, inf megabytes or NaN megavoxels ended in a traceback (OverflowError) or a line naming no flag."""
    from migserve.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", *args])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"migserve serve: error: {message}"


@pytest.mark.parametrize("seed", ["-1", "abc", str(1 << 64)])
def test_export_refuses_a_seed_the_generators_cannot_take(seed: str, capsys: pytest.CaptureFixture[str]) -> None:
    """numpy's takes no negative seed, torch's none of 2**64 or more: -1 was a traceback after torch had loaded."""
    from migserve.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["export", "--all", f"--seed={seed}"])
    assert exited.value.code == 2
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said == f"migserve export: error: argument --seed: expected a whole number from 0 to 2**64 - 1; got '{seed}'"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--jobs", "-1"], "--jobs -1: give 1 or more, or 0 for one per usable core"),
        (["--stop-grace-s", "-1"], "--stop-grace-s -1: give 0 or more seconds"),
        (["--stop-grace-s", "nan"], "--stop-grace-s nan: give 0 or more seconds"),
        (["--stop-grace-s", "inf"], "--stop-grace-s inf: give 0 or more seconds"),
    ],
)
def test_export_refuses_counts_and_waits_it_cannot_use(args: list[str], message: str, tmp_path: Path) -> None:
    """Said before anything is exported or written (and before torch is imported)."""
    from migserve.cli import build_parser

    out, err = io.StringIO(), io.StringIO()
    parsed = build_parser().parse_args(["export", "--model", "crowd-csrnet", "--out", str(tmp_path / "repo"), *args])
    assert run(parsed, out, err) == 2
    assert err.getvalue() == f"error: {message}\n" and not (tmp_path / "repo").exists()
