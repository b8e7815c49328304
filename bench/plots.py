"""PNG plots of benchmark rows: throughput vs N with the same-traffic roofline, speedups vs peers.

matplotlib (Agg backend) is imported only when a plot is drawn, so the JSON and table part of
the report works without it.
"""

from __future__ import annotations

from pathlib import Path

from report import PEERS, ROOFLINE, Row, bandwidth_unit, derived

PEER_LABELS = {"torch_radam_foreach": "vs torch RAdam foreach", "torch_adam_fused": "vs torch Adam fused"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` (creating its folder) and free it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def _plain_log_ticks(axis) -> None:
    """Label a log axis with plain numbers (``3``, ``30``) instead of powers of ten."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}".lstrip("0.")[:1] in ("2", "5") else ""))


def _short(device: str) -> str:
    return device if len(device) <= 48 else device[:45] + "..."


def _mebi(n: int) -> str:
    return f"{n / 2**20:g}M" if n % 2**20 == 0 else f"{n:,}"


def throughput_plot(rows: list[Row], path: Path) -> Path | None:
    """Throughput vs N on log-log axes, one panel per (device, dtype), flat buffers only (3 to a row).

    Every implementation is a line of markers; the same-traffic kernel (this machine's
    in-place roofline) is a dashed black line. Returns ``path``, or None without flat rows.
    """
    flat = [r for r in rows if r.tensors == "flat"]
    panels = sorted({(r.device, r.dtype) for r in flat})
    if not panels:
        return None
    plt = _pyplot()
    columns = min(3, len(panels))
    grid_rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(5.5 * columns, 4.2 * grid_rows), dpi=80, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (device, dtype) in zip(axes.flat, panels):
        unit, scale = bandwidth_unit(device)
        here = [r for r in flat if (r.device, r.dtype) == (device, dtype)]
        values = [r.bandwidth / scale for r in here]
        ax.set_ylim(min(values) / 1.5, max(values) * 1.5)  # a readable span even for one size
        for implementation in sorted({r.implementation for r in here}, key=lambda i: (i == ROOFLINE, i)):
            points = sorted((r.n, r.bandwidth / scale) for r in here if r.implementation == implementation)
            xs, ys = zip(*points)
            if implementation == ROOFLINE:
                ax.plot(xs, ys, "k--", lw=1.5, marker="_", ms=24, mew=2, label="same-traffic roofline")
            else:
                ax.plot(xs, ys, marker="o", ms=5, lw=1, label=implementation)
        ax.set(xscale="log", yscale="log", xlabel="N (elements)", ylabel=unit,
               title=f"{_short(device)}\n{dtype}, flat buffers")
        _plain_log_ticks(ax.yaxis)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def speedup_plot(rows: list[Row], path: Path, implementation: str = "fastradam") -> Path | None:
    """Bars of ``implementation``'s speedup vs each peer, per case (dtype, N, split), one panel per device.

    The y axis is logarithmic and 1x is drawn. Returns ``path``, or None when no case has a peer.
    """
    cases: dict[str, list[tuple[str, dict[str, float]]]] = {}
    for row in sorted(rows, key=lambda r: (r.device, r.dtype, r.n, r.tensors)):
        if row.implementation != implementation:
            continue
        d = derived(row, rows)
        speedups = {peer: d[f"speedup_vs_{peer}"] for peer in PEERS if f"speedup_vs_{peer}" in d}
        if speedups:
            label = f"{row.dtype}\n{_mebi(row.n)}" + ("" if row.tensors == "flat" else f"\nas {row.tensors}")
            cases.setdefault(row.device, []).append((label, speedups))
    if not cases:
        return None
    plt = _pyplot()
    devices = sorted(cases)
    fig, axes = plt.subplots(1, len(devices), figsize=(max(5.0, 1.3 * max(len(c) for c in cases.values()) + 2)
                                                       * len(devices), 4.2), dpi=80, squeeze=False)
    width = 0.35
    for ax, device in zip(axes[0], devices):
        labels = [label for label, _ in cases[device]]
        for k, peer in enumerate(PEERS):
            xs = [i + (k - (len(PEERS) - 1) / 2) * width for i in range(len(labels))]
            values = [speedups.get(peer, float("nan")) for _, speedups in cases[device]]
            bars = ax.bar(xs, values, width, label=PEER_LABELS.get(peer, peer))
            ax.bar_label(bars, labels=["" if v != v else f"{v:.1f}x" for v in values], fontsize=7)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlim(-0.75, len(labels) - 0.25)
        ax.set(yscale="log", ylabel="speedup (peer time / fastradam time)", title=f"{implementation}, {_short(device)}")
        _plain_log_ticks(ax.yaxis)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def write_plots(rows: list[Row], folder: Path) -> list[Path]:
    """Both plots as ``throughput.png`` and ``speedups.png`` in ``folder``; the paths written."""
    written = [throughput_plot(rows, folder / "throughput.png"), speedup_plot(rows, folder / "speedups.png")]
    return [p for p in written if p is not None]
