"""The export CLI as a user meets it: checkpoints, fp16, options, and every way it can fail."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

from exporters import zoo
from exporters.cli import up_to_date
from exporters.errors import OutputError, ParityFailed
from exporters.parity import run_torch
from exporters.pipeline import export_model, write_model_dir
from exporters.request import ExportRequest
from exporters.triton import PYTHON_MODEL
from migserve.contract import read_contract, sha256_file, write_contract
from tests.helpers import GROUP, MIGSERVE, ROOT, ExportedRepo, migserve, migserve_imports, processes_where, running, sigint_not_ignored


def _failed_cleanly(run_out: Path, returncode: int, stderr: str, fragment: str) -> None:
    assert returncode != 0
    assert fragment in stderr, stderr
    assert "Traceback" not in stderr
    leftovers = [p.name for p in run_out.iterdir()] if run_out.exists() else []
    assert leftovers == [], f"partial output left behind: {leftovers}"


def test_unknown_model(tmp_path: Path) -> None:
    run = migserve("export", "--model", "crowd-csrnt", "--out", tmp_path / "repo")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"error: unknown model 'crowd-csrnt'; known: {', '.join(zoo.ZOO)}"]
    assert not (tmp_path / "repo").exists()


def test_missing_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "repo"
    run = migserve("export", "--model", "crowd-csrnet", "--checkpoint", f"crowd-csrnet={tmp_path / 'nope.pth'}", "--out", out)
    _failed_cleanly(out, run.returncode, run.stderr, "checkpoint not found")


def test_checkpoint_of_another_model_names_the_keys(tmp_path: Path) -> None:
    face = zoo.get("face-pros")
    path = tmp_path / "face.safetensors"
    save_file(face.build(face.config("tiny")).state_dict(), str(path))
    out = tmp_path / "repo"
    run = migserve("export", "--model", "crowd-csrnet", "--checkpoint", f"crowd-csrnet={path}", "--out", out)
    _failed_cleanly(out, run.returncode, run.stderr, "missing 34: backend.0.bias, backend.0.weight")
    assert "unexpected" in run.stderr and "blocks.0.attn.qkv.weight" in run.stderr


def test_unwritable_output(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    run = migserve("export", "--all", "--out", blocker / "repo")
    assert run.returncode == 1
    assert run.stderr.splitlines() == [f"error: cannot write to {blocker / 'repo'}: Not a directory"], "said before any export"
    # an output that stops being writable during the exports: the model's write fails the same way, and leaves nothing
    proto = onnx.load(str(tiny_repo.root / "crowd-csrnet" / "1" / "model.onnx"))
    with pytest.raises(OutputError, match=f"cannot write to {blocker / 'repo'}: Not a directory"):
        write_model_dir(blocker / "repo", "crowd-csrnet", proto, lambda _: read_contract(tiny_repo.root / "crowd-csrnet"), {})


def test_ctrl_c_between_the_renames_of_a_re_export_leaves_the_new_model_in_place(
    tiny_repo: ExportedRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-export moves the earlier folder aside, then the new one in: a Ctrl-C that came between used to leave the
    model with no folder (and the earlier one hidden beside it). Now it is taken once both are done."""
    proto = onnx.load(str(tiny_repo.root / "crowd-csrnet" / "1" / "model.onnx"))
    contract = read_contract(tiny_repo.root / "crowd-csrnet")
    final = write_model_dir(tmp_path, "crowd-csrnet", proto, lambda _: contract, {})
    rename = Path.rename

    def rename_then_ctrl_c(self: Path, target: str | Path) -> Path:
        moved = rename(self, target)
        if self == final:  # the earlier export moved aside
            os.kill(os.getpid(), signal.SIGINT)
        return moved

    monkeypatch.setattr(Path, "rename", rename_then_ctrl_c)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever this test process was given
    try:
        with pytest.raises(KeyboardInterrupt):
            write_model_dir(tmp_path, "crowd-csrnet", proto, lambda _: contract, {})
    finally:
        signal.signal(signal.SIGINT, handler)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crowd-csrnet"]
    assert read_contract(final) == contract


def test_a_stop_does_not_wait_for_the_running_step(tmp_path: Path) -> None:
    """SIGTERM while lns-organs at paper size checks its parity (a step of about 77 s on this 2-core host): the export
    processes are interrupted where they are instead of finishing the step first (before, the command took 78.0 s to
    end; now 1.5 s: bench/stop_ab.py), nothing is written and nothing left behind."""
    out, log = tmp_path / "repo", tmp_path / "export.log"
    command = [MIGSERVE, "export", "--model", "lns-organs", "crowd-csrnet", "--size", "paper", "--out", str(out), "--jobs", "2"]
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "lns-organs (paper): checking parity" not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.05)
        time.sleep(1)  # inside the step
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=30)  # the step itself takes minutes
        time.sleep(1)  # the pool's resource tracker ends as its last user does
        left = {pid for pid in processes_where(GROUP, process.pid) if running(pid)}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    output = log.read_text()
    assert status == 143 and "migserve export: terminated" in output and "Traceback" not in output, output
    assert "lns-organs (paper): wrote" not in output and not left
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


# An export process as `_start_process` makes one, in an export that takes any exception raised inside it for one of
# its own and goes on, as torch's tracing did with a stop's (bench/stop_anywhere.py): it says a line, then loops.
_SWALLOWING_EXPORT = """
import multiprocessing as mp, signal, time
from exporters import cli
context = mp.get_context("spawn")
cli._process.update(lines=context.Queue(), stop=context.Event(), exporting=True)
signal.signal(signal.SIGINT, cli._stop_now)
cli._said("[1/1] model (tiny): exporting")  # its queue's feeder thread started, as in an export
print("exporting", flush=True)
while True:
    try:
        time.sleep(0.01)
    except BaseException as exc:
        print("went on after", type(exc).__name__, flush=True)
"""


def test_a_stop_ends_an_export_process_whatever_the_export_does_with_exceptions() -> None:
    """SIGINT ends an export process that is exporting at once, with 130, without raising into the export: torch took
    the exception raised inside its tracing for a failure of its own (the stop reported as the model FAILED, and the
    command went on to the next model) or aborted on it (c10::Error), in a few stops in a hundred (bench/RESULTS.md)."""
    with sigint_not_ignored():
        process = subprocess.Popen(
            [sys.executable, "-c", _SWALLOWING_EXPORT], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    try:
        assert process.stdout is not None and process.stdout.readline() == "exporting\n"
        process.send_signal(signal.SIGINT)
        status = process.wait(timeout=10)
    finally:
        process.kill()
        output = process.communicate()[0]
    # (its queue and event are its own here, not the first process's: the resource tracker may say it removed them)
    assert status == 128 + signal.SIGINT and "went on" not in output and "Traceback" not in output, output


# A process writing a model folder with the real `write_model_dir`, stopped at a chosen point: `between-renames`, SIGKILL
# once the earlier folder is moved aside; `writing`, SIGKILL once model.onnx is written into its temporary folder;
# `alive`, waits there (it says "holding" first) until killed.
_WRITER = """
import os, signal, sys, time
from pathlib import Path
import onnx
from exporters.pipeline import write_model_dir
from migserve.contract import read_contract
out, source, name, how = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
proto, contract = onnx.load(str(source / "1" / "model.onnx")), read_contract(source)
rename, save = Path.rename, onnx.save
def renamed(self, target):
    moved = rename(self, target)
    if how == "between-renames" and str(target).endswith(".old"):
        os.kill(os.getpid(), signal.SIGKILL)
    return moved
def saved(*args, **kwargs):
    save(*args, **kwargs)
    if how == "writing":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "alive":
        print("holding", flush=True)
        time.sleep(600)
Path.rename, onnx.save = renamed, saved
write_model_dir(out, name, proto, lambda _: contract, {})
"""


def _writer(out: Path, source: Path, name: str, how: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-c", _WRITER, str(out), str(source), name, how]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE if how == "alive" else None, text=True)


def test_the_next_export_cleans_up_after_one_that_was_killed(
    tiny_repo: ExportedRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGKILLed export (or one the OOM killer took) leaves what its Ctrl-C path would have removed. The next export
    puts back a model moved aside by a re-export killed between its two renames (the model had no folder), and removes
    the unfinished folders and the TMPDIR of exports that were killed, but not those of an export still running, nor
    one made in the last minute (its writer may not have locked it yet); it says what it did."""
    out, scratch = tmp_path / "repo", tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    source = tiny_repo.root / "crowd-csrnet"
    shutil.copytree(source, out / "crowd-csrnet")
    shutil.copytree(tiny_repo.root / "lns-organs", out / "lns-organs")
    killed = [_writer(out, source, "crowd-csrnet", "between-renames"), _writer(out, source, "lns-organs", "writing")]
    young = _writer(out, source, "face-pros", "writing")
    alive = _writer(out, source, "grounding-mgsl", "alive")
    try:
        assert alive.stdout is not None and alive.stdout.readline() == "holding\n"
        assert [writer.wait(60) for writer in [*killed, young]] == [-signal.SIGKILL] * 3
        export = subprocess.Popen(  # a --jobs export killed while its processes run: its TMPDIR stays
            [MIGSERVE, "export", "--model", "face-pros", "lns-stations", "--out", str(tmp_path / "other"), "--jobs", "2"],
            stderr=subprocess.PIPE,
            text=True,
        )
        assert export.stderr is not None and "building" in export.stderr.readline()
        export.kill()
        export.wait()
        export.stderr.close()
        hidden = {p.name.split(".")[1]: p for p in out.iterdir() if p.name.startswith(".")}
        assert sorted(hidden) == ["crowd-csrnet", "face-pros", "grounding-mgsl", "lns-organs"], hidden
        assert not (out / "crowd-csrnet").exists()  # the re-export killed between its renames left it aside
        left = [*out.glob(".*.old"), *out.glob(".*.tmp"), *scratch.glob("migserve-export-*")]
        assert len(left) == 6, left  # crowd-csrnet's .old and .tmp, three more .tmp, the killed export's TMPDIR
        long_ago = time.time() - 120
        for folder in left:
            if not folder.name.startswith(".face-pros."):
                os.utime(folder, (long_ago, long_ago))
        run = migserve("export", "--model", "crowd-csrnet", "lns-organs", "--skip-existing", "--out", out)
        assert run.returncode == 0, run.stderr
        said = run.stderr.splitlines()
        old = next(p.name for p in left if p.name.endswith(".old"))
        assert f"put back {out / 'crowd-csrnet'}: an export killed while replacing it had moved it aside as {old}" in said
        assert [line for line in said if line.startswith("removed ")] == [
            f"removed {out / old.replace('.old', '.tmp')}: the unfinished folder of an export that was killed",
            f"removed {hidden['lns-organs']}: the unfinished folder of an export that was killed",
            f"removed {next(p for p in left if p.parent == scratch)}: the temporary directory of an export that was killed",
        ], said
        assert "[ 1/2] crowd-csrnet (tiny): up to date, skipped" in run.stderr  # the model put back is whole
        assert read_contract(out / "crowd-csrnet") == read_contract(source)
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == sorted(
            [hidden["face-pros"].name, hidden["grounding-mgsl"].name]
        ), "the young folder and the one still held stay"
        assert not list(scratch.glob("migserve-export-*"))
    finally:
        alive.kill()
        alive.communicate()


def test_parity_failure_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mdef = zoo.get("lns-organs")
    monkeypatch.setattr(type(mdef), "tolerance", 1e-12)  # no fp32 export is that exact
    with pytest.raises(ParityFailed, match=r"parity failed on sample 'batch1', output logits: relative error .* > tolerance 1e-12"):
        export_model(ExportRequest(name="lns-organs", out=tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_trained_checkpoint_is_exported_and_recorded(tmp_path: Path) -> None:
    mdef = zoo.get("crowd-csrnet")
    cfg = mdef.config("tiny")
    torch.manual_seed(1234)
    trained = mdef.build(cfg).eval()
    path = tmp_path / "PartA_model.safetensors"
    save_file(trained.state_dict(), str(path))
    out = tmp_path / "repo"
    run = migserve("export", "--model", "crowd-csrnet", "--checkpoint", f"crowd-csrnet={path}", "--out", out)
    assert run.returncode == 0, run.stderr
    assert "checkpoint" in run.stdout.splitlines()[2]
    contract = read_contract(out / "crowd-csrnet")
    assert contract.provenance.weights == "checkpoint"
    assert contract.provenance.checkpoint_sha256 == sha256_file(path)
    assert contract.provenance.checkpoint_name == "PartA_model.safetensors"
    image = np.random.default_rng(0).standard_normal((2, 3, 64, 80)).astype(np.float32)
    session = ort.InferenceSession(str(out / "crowd-csrnet" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (density,) = session.run(None, {"image": image})
    (expected,) = run_torch(trained, {"image": image})
    np.testing.assert_allclose(density, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    same = ExportRequest(name="crowd-csrnet", out=out, checkpoint=path)
    assert up_to_date(out / "crowd-csrnet", same) is not None, "--skip-existing keeps an export of the same checkpoint"
    assert up_to_date(out / "crowd-csrnet", ExportRequest(name="crowd-csrnet", out=out)) is None, "not for the random init"
    save_file(mdef.build(cfg).state_dict(), str(path))  # the same file name, other weights
    assert up_to_date(out / "crowd-csrnet", same) is None


def test_skip_existing_keeps_only_the_export_it_would_write_again(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo.root / "face-pros", repo / "face-pros")
    model = repo / "face-pros"
    assert up_to_date(model, ExportRequest(name="face-pros")) is not None
    for other in (
        ExportRequest(name="face-pros", size="paper"),
        ExportRequest(name="face-pros", seed=1),
        ExportRequest(name="face-pros", fp16=True),
        ExportRequest(name="face-pros", options={"expression_classes": "8"}),  # not in the contract: always redone
    ):
        assert up_to_date(model, other) is None, other
    args = ("export", "--model", "face-pros", "--skip-existing", "--out", repo)
    run = migserve(*args, "--triton-backend", "python")
    assert run.returncode == 0 and "up to date, skipped (its config.pbtxt switched to Triton's python backend)" in run.stderr
    assert 'backend: "python"' in (model / "config.pbtxt").read_text() and (model / "1" / "model.py").is_file()
    run = migserve(*args)  # and back: Triton's onnxruntime backend, no model.py left behind
    assert "up to date, skipped (its config.pbtxt switched to Triton's onnxruntime backend)" in run.stderr
    assert (model / "config.pbtxt").read_text() == (tiny_repo.root / "face-pros" / "config.pbtxt").read_text()
    assert sorted(p.name for p in (model / "1").iterdir()) == ["model.onnx"]
    run = migserve(*args)
    assert run.returncode == 0 and "up to date, skipped\n" in run.stderr, run.stderr
    contract = read_contract(model)
    write_contract(model, contract.model_copy(update={"memory": None}))  # as exported before contracts carried it
    assert up_to_date(model, ExportRequest(name="face-pros")) is None, "made again, for placement to have the estimate"
    write_contract(model, contract)
    (model / "1" / "model.onnx").write_bytes(b"not the exported model")
    assert up_to_date(model, ExportRequest(name="face-pros")) is None


def test_a_repository_up_to_date_is_checked_without_importing_torch(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    """`make serve` runs `export --all --skip-existing` each time: with every model up to date, it no longer imports
    torch (seconds) to say so. (tests/e2e/test_make.py has a model that is not up to date exported again.)"""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo.root, repo)
    run, torch_imported = migserve_imports("torch", "export", "--all", "--skip-existing", "--out", str(repo))
    assert (run.returncode, torch_imported) == (0, False), run.stderr
    assert run.stderr.splitlines() == [f"[{i:>2}/10] {name} (tiny): up to date, skipped" for i, name in enumerate(zoo.ZOO, 1)]


def test_fp16_keeps_fp32_io_and_records_it(tmp_path: Path) -> None:
    result = export_model(ExportRequest(name="crowd-csrnet", out=tmp_path, fp16=True))
    contract = read_contract(result.path)
    assert contract.provenance.fp16 and contract.parity.tolerance == 1e-2
    assert 0 < contract.parity.worst <= 1e-2
    graph = onnx.load(str(result.path / "1" / "model.onnx")).graph
    assert [i.type.tensor_type.elem_type for i in graph.input] == [onnx.TensorProto.FLOAT]
    assert {t.data_type for t in graph.initializer if len(t.dims) == 4} == {onnx.TensorProto.FLOAT16}


def test_options_change_the_exported_graph(tmp_path: Path) -> None:
    args = ("--set", "face-pros.expression_classes=8", "--triton-backend", "python", "--out", tmp_path)
    run = migserve("export", "--model", "face-pros", *args)
    assert run.returncode == 0, run.stderr
    contract = read_contract(tmp_path / "face-pros")
    assert contract.output("expression").shape == ("batch", 8)
    assert contract.postprocessing.expression_labels[-1] == "Contempt"  # type: ignore[union-attr]
    # exported as a python-backend twin (the Triton tests switch the tiny repo's exports to twins instead)
    assert 'backend: "python"' in (tmp_path / "face-pros" / "config.pbtxt").read_text()
    assert (tmp_path / "face-pros" / "1" / "model.py").read_text() == PYTHON_MODEL.read_text()


def test_failed_re_export_keeps_the_good_model(tiny_repo: ExportedRepo, tmp_path: Path) -> None:
    model = tmp_path / "frontalize-dalgan"  # the good model: the session's export
    shutil.copytree(tiny_repo.root / "frontalize-dalgan", model)
    digest = sha256_file(model / "1" / "model.onnx")
    corrupt = tmp_path.parent / f"{tmp_path.name}-corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 truncated zip")
    run = migserve("export", "--model", "frontalize-dalgan", "--checkpoint", f"frontalize-dalgan={corrupt}", "--out", tmp_path)
    assert run.returncode == 1 and "cannot read checkpoint" in run.stderr
    assert sha256_file(model / "1" / "model.onnx") == digest
    again = export_model(ExportRequest(name="frontalize-dalgan", out=tmp_path, seed=1))
    assert again.path == model and sha256_file(model / "1" / "model.onnx") != digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frontalize-dalgan"]


def test_models_exported_in_parallel_processes_report_each_outcome_in_order(tmp_path: Path) -> None:
    """--jobs 2: two export processes; one model's failure fails it alone, its progress and reason are printed, and
    the table lists the models in the order asked for."""
    out = tmp_path / "repo"
    missing = tmp_path / "nope.pth"
    args = ("--model", "lns-organs", "frontalize-dalgan", "lns-stations", "--checkpoint", f"frontalize-dalgan={missing}")
    run = migserve("export", *args, "--out", out, "--jobs", "2")
    assert run.returncode == 1
    assert sorted(p.name for p in out.iterdir()) == ["lns-organs", "lns-stations"]
    assert "[ 2/3] frontalize-dalgan (tiny): FAILED: checkpoint not found" in run.stderr
    assert "[ 1/3] lns-organs (tiny): checking parity" in run.stderr and "[ 3/3] lns-stations (tiny): wrote" in run.stderr
    assert [line.split()[0] for line in run.stdout.splitlines()[2:]] == ["lns-organs", "lns-stations", "frontalize-dalgan"]
    assert "Traceback" not in run.stderr


def _let_go_when_asked_where(process: subprocess.Popen[bytes], log: Path) -> None:
    """Once the export asks its stopped (SIGSTOP) processes where they stand, let them go on (SIGCONT): they write
    their stacks, then are killed."""
    deadline = time.monotonic() + 30
    while "where:" not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in processes_where(GROUP, process.pid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGCONT)


def _export_until_stopped(out: Path, jobs: int, how: str) -> tuple[int, str, float, set[int]]:
    """`migserve export` of five models in a process group of its own, stopped once the first model is written:
    `ctrl-c`, SIGINT to the group (as a terminal's Ctrl-C); `ctrl-c-twice`, again once it says it is stopping, its
    export processes stopped first (as exports stuck in a long step); `sigterm` and `sigkill`, that signal to the first
    process alone (a supervisor's stop, the OOM killer); `stuck`, SIGTERM with the export processes stopped (SIGSTOP)
    first, so that they have not ended at --stop-grace-s (3 s, else 20), then let go on once asked for their stacks. Its
    exit status, output, seconds from the first signal to its end, and the processes of its group still running 1 s
    after."""
    models = ("face-pros", "frontalize-dalgan", "grounding-mgsl", "grounding-ssrn", "crowd-csrnet")
    log = out.parent / "export.log"
    grace = "3" if how == "stuck" else "20"
    command = [MIGSERVE, "export", "--model", *models, "--size", "tiny", "--out", str(out), "--jobs", str(jobs), "--stop-grace-s", grace]
    with log.open("w") as sink, sigint_not_ignored():
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for wanted in ("wrote", "interrupted:") if how == "ctrl-c-twice" else ("wrote",):
            deadline = time.monotonic() + 120
            while wanted not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert process.poll() is None, log.read_text()
            if wanted == "interrupted:" or how == "stuck":
                for pid in processes_where(GROUP, process.pid):
                    with contextlib.suppress(OSError):
                        if b"multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_bytes():
                            os.kill(pid, signal.SIGSTOP)
            if how.startswith("ctrl-c"):
                os.killpg(process.pid, signal.SIGINT)
            else:
                process.send_signal(signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
            if wanted == "wrote":
                stopped = time.monotonic()
        if how == "stuck":
            _let_go_when_asked_where(process, log)
        status = process.wait(timeout=30)
        took = time.monotonic() - stopped
        time.sleep(1)  # the pool's resource tracker ends as its last user does
        return status, log.read_text(), took, {pid for pid in processes_where(GROUP, process.pid) if running(pid)}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()  # reaped here, not left for a later test to warn of
        if process.returncode == -signal.SIGKILL and how != "sigkill":
            print(log.read_text())  # what it said before it was killed, for the failure's report


@pytest.mark.parametrize(
    ("jobs", "how"), [(1, "ctrl-c"), (2, "ctrl-c"), (2, "ctrl-c-twice"), (2, "sigterm"), (2, "stuck"), (2, "sigkill")], ids=str
)
def test_a_stopped_export_leaves_only_whole_models_and_no_process(tmp_path: Path, jobs: int, how: str) -> None:
    """Ctrl-C during `migserve export`: it ends by SIGINT, as a terminal's job should, says so without a traceback,
    begins none of the models not started, and leaves no half-written folder, in the output or in the temporary
    directory. The exports run in processes of their own (with --jobs 1 too), which end where their exports stand, and
    the first one tells them to take no more (before, the pool ran every model queued, as orphans after a second
    Ctrl-C); a second Ctrl-C kills them. SIGTERM does what
    Ctrl-C does, with status 143; SIGKILL of the first process takes its export processes with it. Export processes
    that do not end after the stop (whatever holds them) are killed at --stop-grace-s, and what they wrote removed:
    before, the command waited for them for ever."""
    out = tmp_path / "repo"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(scratch))  # what the export (and its processes) leave in the temporary directory
        status, output, took, left = _export_until_stopped(out, jobs, how)
    assert not left, f"processes of the export still running: {left}"
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert 1 <= len(written) <= 2, written  # the first, and at most the one running beside it
    for name in written:
        contract = read_contract(out / name)
        assert sha256_file(out / name / contract.model_file) == contract.model_sha256
    if how == "sigkill":  # nothing runs to clean up after a SIGKILL: its temporary folders may stay
        assert status == -signal.SIGKILL
        return
    assert status == (-signal.SIGINT if how.startswith("ctrl-c") else 143), output
    said = "interrupted" if how.startswith("ctrl-c") else "terminated"
    assert f"migserve export: {said}" in output and "Traceback" not in output, output
    assert "Ctrl-C again kills them" in output  # --jobs 1 too: each export runs in a process of its own
    # Without SIGSTOP an export process ends within seconds of the stop; in about one CI run in five one did not within
    # 30 s (cause not found): such a one is now killed at --stop-grace-s (20 s here), which this test takes as the end
    if how == "stuck":  # where each stood, for a report: the stacks of its threads, then the kill
        assert "still running 3 s after the stop (--stop-grace-s), where:\nexport process " in output, output
        assert "(most recent call first)" in output and "killing them" in output, output
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary folders of the exports stopped"
    left_behind = [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")]  # torch's cache, kept
    assert not left_behind, f"the export's temporary files were left behind: {left_behind}"
    assert took < 45, f"{took:.1f} s from the signal to the end"
