"""Turn pytest-benchmark JSON into the fastradam table: bandwidth, roofline share, speedups.

Every benchmark in the suites records ``extra_info`` with ``implementation``, ``n``,
``dtype``, ``device``, ``bytes_per_element`` and, for multi-tensor cases, ``tensors`` (how
the N elements are split, e.g. ``16384x1024``); the rest is derived here, in one place,
for the JSON hook in ``bench/conftest.py`` and for ``python -m fastradam.bench``.

Usage: ``python bench/report.py RESULTS.json [MORE.json ...] [--markdown REPORT.md] [--no-plots]``
(the plots, by ``bench/plots.py``, go beside the Markdown file).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

ROOFLINE = "same_traffic"
PEERS = ("torch_radam_foreach", "torch_adam_fused")


@dataclass(frozen=True)
class Row:
    """One benchmark: an implementation at one size, dtype and device, and its median time."""

    implementation: str
    n: int
    dtype: str
    device: str
    bytes_per_element: int
    median_s: float
    tensors: str = "flat"

    @property
    def machine_key(self) -> tuple[int, str, str]:
        """What the roofline depends on: the element count, dtype and device."""
        return self.n, self.dtype, self.device

    @property
    def key(self) -> tuple[int, str, str, str]:
        """What peers are compared on: the machine key and the split into tensors."""
        return self.n, self.dtype, self.device, self.tensors

    @property
    def bandwidth(self) -> float:
        """Effective bandwidth in bytes per second: bytes moved per element x n / time."""
        return self.bytes_per_element * self.n / self.median_s


def rows_from_json(data: dict[str, Any]) -> list[Row]:
    """Rows of a pytest-benchmark JSON document (benchmarks without our extra_info are skipped)."""
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "implementation" not in info:
            continue
        rows.append(Row(info["implementation"], int(info["n"]), info["dtype"], info["device"],
                        int(info["bytes_per_element"]), float(bench["stats"]["median"]),
                        info.get("tensors", "flat")))
    return rows


def derived(row: Row, rows: Iterable[Row]) -> dict[str, float]:
    """Bandwidth, share of the same-traffic kernel and speedup vs each peer, where measured.

    Multi-tensor rows also get their share of fastradam's time on one flat buffer of the
    same N (``share_of_flat``).
    """
    rows = list(rows)
    same = {r.implementation: r for r in rows if r.key == row.key}
    flat = {r.implementation: r for r in rows if r.machine_key == row.machine_key and r.tensors == "flat"}
    out = {"gb_per_s": row.bandwidth / 1e9}
    if ROOFLINE in flat:
        out["share_of_same_traffic"] = flat[ROOFLINE].median_s / row.median_s
    if row.tensors != "flat" and "fastradam" in flat:
        out["share_of_flat"] = flat["fastradam"].median_s / row.median_s
    for peer in PEERS:
        if peer in same:
            out[f"speedup_vs_{peer}"] = same[peer].median_s / row.median_s
    return out


def add_derived_to_json(data: dict[str, Any]) -> None:
    """Write :func:`derived` figures into each benchmark's ``extra_info`` (in place)."""
    rows = rows_from_json(data)
    by_name = {(r.implementation, r.key): r for r in rows}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "implementation" in info:
            key = (int(info["n"]), info["dtype"], info["device"], info.get("tensors", "flat"))
            info.update(derived(by_name[(info["implementation"], key)], rows))


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def bandwidth_unit(device: str) -> tuple[str, float]:
    """The unit bandwidth is shown in on ``device`` and its size in bytes per second: TB/s on a GPU, else GB/s."""
    return ("TB/s", 1e12) if device.startswith("gpu") else ("GB/s", 1e9)


def throughput(row: Row) -> str:
    """The row's effective bandwidth in its device's unit, e.g. ``38.2 GB/s`` or ``2.95 TB/s``."""
    unit, scale = bandwidth_unit(row.device)
    return f"{row.bandwidth / scale:.{2 if unit == 'TB/s' else 1}f} {unit}"


def markdown_table(rows: list[Row]) -> str:
    """The report table, one line per benchmark, grouped by device, dtype and size."""
    lines = [
        "| device | dtype | N | tensors | implementation | median ms | throughput | share of same-traffic | "
        "share of flat fastradam | vs torch RAdam foreach | vs torch Adam fused |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sorted(rows, key=lambda r: (r.device, r.dtype, r.n, r.tensors, r.median_s)):
        d = derived(row, rows)
        share = d.get("share_of_same_traffic")
        flat = d.get("share_of_flat")
        lines.append(
            f"| {row.device} | {row.dtype} | {row.n:,} | {row.tensors} | {row.implementation} | "
            f"{row.median_s * 1e3:.3f} | {throughput(row)} | "
            f"{'' if share is None else f'{share:.2f}'} | {'' if flat is None else f'{flat:.2f}'} | "
            f"{_ratio(d.get('speedup_vs_torch_radam_foreach'))} | {_ratio(d.get('speedup_vs_torch_adam_fused'))} |"
        )
    return "\n".join(lines)


def machine_lines(data: dict[str, Any], source: str = "") -> list[str]:
    """A short description of the machine a JSON document was recorded on: CPU, threads, GPU.

    The GPU comes from ``machine_info["fastradam"]["gpu"]`` when the suite recorded it, else
    from the ``gpu: NAME`` devices of the document's benchmarks.
    """
    info = data.get("machine_info", {})
    fastradam = info.get("fastradam", {})
    parts = [f"CPU: {fastradam.get('cpu_model') or info.get('cpu', {}).get('brand_raw', 'unknown')}"]
    for key in ("logical_cpus", "numba_threads", "torch_threads"):
        if fastradam.get(key):
            parts.append(f"{key.replace('_', ' ')}: {fastradam[key]}")
    gpus = [fastradam["gpu"]] if fastradam.get("gpu") else sorted(
        {r.device.split(":", 1)[1].strip() for r in rows_from_json(data) if r.device.startswith("gpu")})
    parts += [f"GPU: {gpu}" for gpu in gpus]
    where = f"; {source}" if source else ""
    return [f"- {'; '.join(str(p) for p in parts)} ({data.get('datetime', 'undated')}{where})"]


def render(paths: list[Path], plots: Path | None = None, relative_to: Path | None = None) -> str:
    """The Markdown report for one or more JSON documents, their rows merged into one table.

    With ``plots`` (a folder), the PNGs of ``bench/plots.py`` are written there and linked,
    relative to ``relative_to`` (the Markdown file's folder) when given. Without matplotlib
    the report says so and has no plots.
    """
    documents = [(Path(p), json.loads(Path(p).read_text())) for p in paths]
    rows = [row for _, doc in documents for row in rows_from_json(doc)]
    machines = [line for path, doc in documents for line in machine_lines(doc, path.name)]
    figures: list[str] = []
    if plots is not None:
        try:
            from plots import write_plots
        except ImportError as error:  # matplotlib missing
            figures = [f"(no plots: {error})", ""]
        else:
            for png in write_plots(rows, plots):
                link = png.relative_to(relative_to) if relative_to else png
                figures += [f"![{png.stem}]({link.as_posix()})", ""]
    return "\n".join(
        ["# fastradam benchmark report", "", "Machines:", *machines, "",
         "Median of pytest-benchmark rounds; throughput = bytes moved per element x N / median time "
         "(GB/s on a CPU, TB/s on a GPU); share of same-traffic = same-traffic kernel time / this "
         "time (1.00 = at this machine's in-place roofline); vs peers = peer time / this time.", "",
         markdown_table(rows), "", *figures]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON files")
    parser.add_argument("--markdown", type=Path, help="also write the report to this file, and its plots beside it")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    args = parser.parse_args(argv)
    folder = args.markdown.parent if args.markdown else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    text = render(args.json, plots=None if args.no_plots or folder is None else folder, relative_to=folder)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
