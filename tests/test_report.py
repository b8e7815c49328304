"""The benchmark report builder (bench/report.py, bench/plots.py) on recorded JSON.

``data/bench_cpu_1m.json`` is a trimmed recording of ``pytest bench/test_bench_cpu.py -k "1M and
not loop and not oracle"`` on the 2-vCPU development machine (a busy one: the torch figures
are slow); ``data/bench_gpu_h100_handwritten.json`` is written by hand in pytest-benchmark's
shape with round medians, standing for a committed ``bench/results/gpu-*.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
DATA = Path(__file__).resolve().parent / "data"
CPU = DATA / "bench_cpu_1m.json"
GPU = DATA / "bench_gpu_h100_handwritten.json"

sys.path.insert(0, str(BENCH))
import report  # noqa: E402


def _line(text: str, *needles: str) -> list[str]:
    """The cells of the one table line holding every needle."""
    lines = [line for line in text.splitlines() if line.startswith("|") and all(n in line for n in needles)]
    assert len(lines) == 1, (needles, lines)
    return [cell.strip() for cell in lines[0].strip("|").split("|")]


def test_cpu_rows_match_hand_computed_figures():
    rows = report.rows_from_json(json.loads(CPU.read_text()))
    fast = next(r for r in rows if r.implementation == "fastradam")
    d = report.derived(fast, rows)
    # 28 bytes x 1,048,576 elements / 0.000198246 s
    assert d["gb_per_s"] == pytest.approx(148.099, rel=1e-5)
    # same-traffic 0.000118557 s / 0.000198246 s
    assert d["share_of_same_traffic"] == pytest.approx(0.59803, rel=1e-4)
    # peers 0.00676213 s and 0.00683255 s over 0.000198246 s
    assert d["speedup_vs_torch_radam_foreach"] == pytest.approx(34.110, rel=1e-4)
    assert d["speedup_vs_torch_adam_fused"] == pytest.approx(34.465, rel=1e-4)
    assert "share_of_flat" not in d


def test_merged_table_has_cpu_and_gpu_rows_in_their_units():
    text = report.render([CPU, GPU])
    cells = _line(text, "cpu: AMD EPYC", "| fastradam |")
    assert cells[2:] == ["1,048,576", "flat", "fastradam", "0.198", "148.1 GB/s", "0.60", "", "34.11x", "34.46x"]
    assert _line(text, "cpu: AMD EPYC", "same_traffic")[6] == "247.6 GB/s"
    gpu = _line(text, "gpu: NVIDIA H100", "| fastradam |")
    # 469,762,048 bytes / 170 us = 2.763 TB/s; 160/170 = 0.94; 1200/170 = 7.06x; 400/170 = 2.35x
    assert gpu[2:] == ["16,777,216", "flat", "fastradam", "0.170", "2.76 TB/s", "0.94", "", "7.06x", "2.35x"]
    # the machines: CPU model and threads from machine_info, the GPU from the rows' device
    assert "CPU: AMD EPYC; logical cpus: 2; numba threads: 2; torch threads: 2" in text
    assert "GPU: NVIDIA H100 80GB HBM3" in text and "bench_gpu_h100_handwritten.json" in text


def test_bandwidth_unit():
    assert report.bandwidth_unit("gpu: NVIDIA H200") == ("TB/s", 1e12)
    assert report.bandwidth_unit("cpu: AMD EPYC") == ("GB/s", 1e9)


def test_main_writes_markdown_and_non_empty_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    markdown = tmp_path / "out" / "report.md"
    report.main([str(CPU), str(GPU), "--markdown", str(markdown)])
    text = markdown.read_text()
    assert text.strip() == capsys.readouterr().out.strip()
    for name in ("throughput.png", "speedups.png"):
        png = markdown.parent / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"]({name})" in text  # linked relative to the Markdown file


def test_no_plots_without_peers_or_when_asked(tmp_path):
    pytest.importorskip("matplotlib")
    import plots

    rows = [r for r in report.rows_from_json(json.loads(CPU.read_text())) if not r.implementation.startswith("torch")]
    assert plots.speedup_plot(rows, tmp_path / "s.png") is None
    assert plots.throughput_plot(rows, tmp_path / "t.png") == tmp_path / "t.png"
    markdown = tmp_path / "plain" / "report.md"
    report.main([str(CPU), "--markdown", str(markdown), "--no-plots"])
    assert not list(markdown.parent.glob("*.png"))
    assert "![" not in markdown.read_text()
