"""The data model of the benchmark results: rows of pytest-benchmark JSON and the figures derived from them.

Every benchmark in the suites records ``extra_info`` with ``implementation``, ``n``,
``dtype``, ``device``, ``bytes_per_element`` and, for multi-tensor cases, ``tensors`` (how
the N elements are split, e.g. ``16384x1024``); the rest is derived here, in one place, for
the JSON hook in ``bench/conftest.py``, for :mod:`fastradam.bench.report` and for
:mod:`fastradam.bench.plots`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

#: The implementation name of the same-traffic kernel (``bench/roofline.py``), the roofline.
ROOFLINE = "same_traffic"
#: The peers the suites time beside fastradam, by the implementation name they record
#: (``bench/peers.py`` builds each one).
PEERS = ("torch_radam_foreach", "torch_radam_loop", "torch_adam_fused")
#: The peers fastradam's speedup is stated over (:func:`derived`, the report's tables and
#: figures). The per-tensor loop is timed and listed with its own figures, but compared with none.
COMPARED_PEERS = tuple(peer for peer in PEERS if peer != "torch_radam_loop")


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
    """Bandwidth, share of the same-traffic kernel and speedup vs each compared peer, where measured.

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
    for peer in COMPARED_PEERS:
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


def bandwidth_unit(device: str) -> tuple[str, float]:
    """The unit bandwidth is shown in on ``device`` and its size in bytes per second: TB/s on a GPU, else GB/s."""
    return ("TB/s", 1e12) if device.startswith("gpu") else ("GB/s", 1e9)
