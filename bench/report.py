"""Plots and a markdown report of a profile sweep (points.json)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

Row = dict[str, Any]


def _by(rows: list[Row], *keys: str) -> dict[tuple[Any, ...], list[Row]]:
    groups: dict[tuple[Any, ...], list[Row]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    return groups


def _models(rows: list[Row]) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in rows))


def _grid(count: int) -> tuple[Any, list[Any]]:
    figure, axes = plt.subplots(1, count, figsize=(4.5 * count, 3.8), squeeze=False)
    return figure, list(axes[0])


def throughput_vs_batch(rows: list[Row], path: Path) -> Path:
    models = _models(rows)
    figure, axes = _grid(len(models))
    for ax, model in zip(axes, models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        top = max(r["concurrency"] for r in mine)
        for (partition,), group in _by([r for r in mine if r["concurrency"] == top], "partition").items():
            group.sort(key=lambda r: r["batch"])
            ax.plot([r["batch"] for r in group], [r["samples_per_s"] for r in group], marker="o", label=partition)
        ax.set(title=f"{model} (concurrency {top})", xlabel="batch", ylabel="samples/s")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    return _save(figure, path)


def latency_vs_concurrency(rows: list[Row], path: Path) -> Path:
    models = _models(rows)
    figure, axes = _grid(len(models))
    for ax, model in zip(axes, models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        batch, partition = min(r["batch"] for r in mine), mine[0]["partition"]
        group = sorted((r for r in mine if r["batch"] == batch and r["partition"] == partition), key=lambda r: r["concurrency"])
        for q in ("p50", "p95", "p99"):
            ax.plot([r["concurrency"] for r in group], [r[f"latency_{q}_ms"] for r in group], marker="o", label=q)
        ax.set(title=f"{model} (batch {batch}, {partition})", xlabel="concurrency", ylabel="latency ms")
        ax.legend(fontsize=7)
    return _save(figure, path)


def throughput_vs_p99(rows: list[Row], path: Path) -> Path:
    figure, ax = plt.subplots(figsize=(6, 4.5))
    for (model,), group in _by(rows, "model").items():
        ax.scatter([r["latency_p99_ms"] for r in group], [r["samples_per_s"] for r in group], label=model, s=18)
    ax.set(xlabel="p99 latency ms", ylabel="samples/s", title="throughput vs tail latency, every point")
    ax.set_xscale("log")
    ax.legend(fontsize=7)
    return _save(figure, path)


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def markdown(rows: list[Row]) -> str:
    first = rows[0]
    lines = [
        "# Profile report",
        "",
        f"Mode `{first['mode']}`, arrival `{first['arrival']}`, {first['duration_s']} s per point, host {first['host']['hostname']} "
        f"({first['host']['cpus']} CPUs), migserve {first['versions']['migserve']}, onnxruntime {first['versions']['onnxruntime']}.",
        "",
        "![throughput vs batch](throughput_vs_batch.png) ![latency vs concurrency](latency_vs_concurrency.png)",
        "![throughput vs p99](throughput_vs_p99.png)",
        "",
        "| model | partition | batch | concurrency | samples/s | p50 ms | p99 ms | worker CPU | RSS MB | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        cpu = f"{r['worker_cpu_util']:.2f}" if r.get("worker_cpu_util") is not None else "-"
        rss = f"{r['worker_rss_mb']:.0f}" if r.get("worker_rss_mb") is not None else "-"
        lines.append(
            f"| {r['model']} | {r['partition']} | {r['batch']} | {r['concurrency']} | {r['samples_per_s']:.1f} "
            f"| {r['latency_p50_ms']:.2f} | {r['latency_p99_ms']:.2f} | {cpu} | {rss} | {r['errors']} |"
        )
    lines += ["", "Best throughput per model:", ""]
    for (model,), group in _by(rows, "model").items():
        best = max(group, key=lambda r: r["samples_per_s"])
        where = f"batch {best['batch']}, concurrency {best['concurrency']} on {best['partition']}"
        lines.append(f"- {model}: {best['samples_per_s']:.1f} samples/s at {where}")
    lines.append("")
    lines.append("Worker CPU: CPU seconds per second of the partition's worker process (1.0 = one core busy).")
    lines.append("Board power and GPU-instance activity need a GPU; none was measured here.")
    return "\n".join(lines) + "\n"


def write_report(rows: list[Row], out: Path) -> list[Path]:
    paths = [
        throughput_vs_batch(rows, out / "throughput_vs_batch.png"),
        latency_vs_concurrency(rows, out / "latency_vs_concurrency.png"),
        throughput_vs_p99(rows, out / "throughput_vs_p99.png"),
    ]
    (out / "report.md").write_text(markdown(rows))
    return [out / "points.csv", out / "points.json", *paths, out / "report.md"]
