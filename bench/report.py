"""Turn pytest-benchmark JSON into the fastradam table: bandwidth, roofline share, speedups.

Every benchmark in the suites records ``extra_info`` with ``implementation``, ``n``,
``dtype``, ``device``, ``bytes_per_element`` and, for multi-tensor cases, ``tensors`` (how
the N elements are split, e.g. ``16384x1024``); the rest is derived here, in one place,
for the JSON hook in ``bench/conftest.py`` and for ``python -m fastradam.bench``.

Usage: ``python bench/report.py RESULTS.json [MORE.json ...] [--markdown REPORT.md]``
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


def markdown_table(rows: list[Row]) -> str:
    """The report table, one line per benchmark, grouped by device, dtype and size."""
    lines = [
        "| device | dtype | N | tensors | implementation | median ms | GB/s | share of same-traffic | "
        "share of flat fastradam | vs torch RAdam foreach | vs torch Adam fused |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sorted(rows, key=lambda r: (r.device, r.dtype, r.n, r.tensors, r.median_s)):
        d = derived(row, rows)
        share = d.get("share_of_same_traffic")
        flat = d.get("share_of_flat")
        lines.append(
            f"| {row.device} | {row.dtype} | {row.n:,} | {row.tensors} | {row.implementation} | "
            f"{row.median_s * 1e3:.3f} | {d['gb_per_s']:.1f} | "
            f"{'' if share is None else f'{share:.2f}'} | {'' if flat is None else f'{flat:.2f}'} | "
            f"{_ratio(d.get('speedup_vs_torch_radam_foreach'))} | {_ratio(d.get('speedup_vs_torch_adam_fused'))} |"
        )
    return "\n".join(lines)


def machine_lines(data: dict[str, Any]) -> list[str]:
    """A short description of the machine a JSON document was recorded on."""
    info = data.get("machine_info", {})
    fastradam = info.get("fastradam", {})
    parts = [fastradam.get("cpu_model") or info.get("cpu", {}).get("brand_raw", "unknown CPU")]
    for key in ("numba_threads", "torch_threads", "gpu"):
        if fastradam.get(key):
            parts.append(f"{key.replace('_', ' ')}: {fastradam[key]}")
    return [f"- {'; '.join(str(p) for p in parts)} ({data.get('datetime', 'undated')})"]


def render(paths: list[Path]) -> str:
    """The Markdown report for one or more JSON documents."""
    documents = [json.loads(Path(p).read_text()) for p in paths]
    rows = [row for doc in documents for row in rows_from_json(doc)]
    machines = [line for doc in documents for line in machine_lines(doc)]
    return "\n".join(
        ["# fastradam benchmark report", "", "Machines:", *machines, "",
         "Median of pytest-benchmark rounds; GB/s = bytes moved per element x N / median time; "
         "share of same-traffic = same-traffic kernel time / this time (1.00 = at this machine's "
         "in-place roofline); vs peers = peer time / this time.", "", markdown_table(rows), ""]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON files")
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    text = render(args.json)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
