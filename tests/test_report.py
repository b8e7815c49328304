"""The benchmark report builder (fastradam.bench.results, .report, .plots) on recorded JSON.

``data/bench_cpu_1m.json`` is a trimmed recording of ``pytest bench/test_bench_cpu.py -k "1M and
not loop and not oracle"`` on the 2-vCPU development machine (a busy one: the torch figures
are slow); ``data/bench_gpu_h100_handwritten.json`` is written by hand in pytest-benchmark's
shape with round medians, standing for a committed ``bench/results/gpu-*.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastradam.bench import plots, report, results

DATA = Path(__file__).resolve().parent / "data"
CPU = DATA / "bench_cpu_1m.json"
GPU = DATA / "bench_gpu_h100_handwritten.json"


def _line(text: str, *needles: str) -> list[str]:
    """The cells of the one table line holding every needle."""
    lines = [line for line in text.splitlines() if line.startswith("|") and all(n in line for n in needles)]
    assert len(lines) == 1, (needles, lines)
    return [cell.strip() for cell in lines[0].strip("|").split("|")]


def test_cpu_rows_match_hand_computed_figures():
    rows = results.rows_from_json(json.loads(CPU.read_text()))
    fast = next(r for r in rows if r.implementation == "fastradam")
    d = results.derived(fast, rows)
    # 28 bytes x 1,048,576 elements / 0.000198246 s
    assert d["gb_per_s"] == pytest.approx(148.099, rel=1e-5)
    # same-traffic 0.000118557 s / 0.000198246 s
    assert d["share_of_same_traffic"] == pytest.approx(0.59803, rel=1e-4)
    # peers 0.00676213 s and 0.00683255 s over 0.000198246 s
    assert d["speedup_vs_torch_radam_foreach"] == pytest.approx(34.110, rel=1e-4)
    assert d["speedup_vs_torch_adam_fused"] == pytest.approx(34.465, rel=1e-4)
    assert "share_of_flat" not in d


def test_this_machine_leads_and_other_machines_follow_in_their_units():
    text = report.render([CPU, GPU])
    this, others = text.split("## Other machines (committed results)")
    assert "## This machine: cpu: AMD EPYC" in this and "NVIDIA" not in this
    # the summary line of the case: bytes, time, throughput, share, vs Adam fused, vs RAdam foreach
    assert _line(this, "| float32 1M |") == ["float32 1M", "28", "0.198", "148.1 GB/s", "0.60", "34.46x", "34.11x"]
    # the full table of this machine
    assert _line(this, "| fastradam |")[:7] == ["float32", "1,048,576", "flat", "fastradam", "0.198", "148.1 GB/s", "0.60"]
    assert _line(this, "same_traffic")[5] == "247.6 GB/s"
    assert "CPU: AMD EPYC; logical cpus: 2; numba threads: 2; torch threads: 2" in this
    # the other machine: its summary only, in TB/s; 469,762,048 bytes / 170 us = 2.763 TB/s;
    # 160/170 = 0.94; 400/170 = 2.35x; 1200/170 = 7.06x
    assert "### gpu: NVIDIA H100 80GB HBM3" in others and "bench_gpu_h100_handwritten.json" in others
    assert _line(others, "| float32 16M |") == ["float32 16M", "28", "0.170", "2.76 TB/s", "0.94", "2.35x", "7.06x"]
    assert "GPU: NVIDIA H100 80GB HBM3" in others and "same_traffic" not in others


def test_cases_carry_the_peers_shares_and_label_variants():
    rows = results.rows_from_json(json.loads(CPU.read_text()))
    rows.append(results.Row("fastradam_4_groups", 2**20, "float32", rows[0].device, 28, 0.0004, "1024x1024"))
    first, split = report.cases(rows)
    assert first.label == "float32 1M" and split.label == "float32 1M as 1024x1024, 4 groups"
    # torch fused Adam 0.00683255 s: its share is same-traffic 0.000118557 / 0.00683255
    assert first.peer_shares["torch_adam_fused"] == pytest.approx(0.000118557 / 0.00683255, rel=1e-4)
    assert split.share == pytest.approx(0.000118557 / 0.0004, rel=1e-4) and split.speedups == {}


def test_bandwidth_unit():
    assert results.bandwidth_unit("gpu: NVIDIA H200") == ("TB/s", 1e12)
    assert results.bandwidth_unit("cpu: AMD EPYC") == ("GB/s", 1e9)


def test_main_writes_markdown_and_a_figure_per_machine(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    markdown = tmp_path / "out" / "report.md"
    report.main([str(CPU), str(GPU), "--markdown", str(markdown)])
    text = markdown.read_text()
    assert text.strip() == capsys.readouterr().out.strip()
    for name in ("this-machine.png", "gpu-nvidia-h100-80gb-hbm3.png"):
        png = markdown.parent / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"]({name})" in text  # linked relative to the Markdown file


def test_no_figure_without_a_roofline_or_when_asked(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [r for r in results.rows_from_json(json.loads(CPU.read_text())) if r.implementation != "same_traffic"]
    assert plots.summary_plot(report.cases(rows), "no roofline", tmp_path / "s.png") is None
    markdown = tmp_path / "plain" / "report.md"
    report.main([str(CPU), "--markdown", str(markdown), "--no-plots"])
    assert not list(markdown.parent.glob("*.png"))
    assert "![" not in markdown.read_text()
