"""The report's figure: per case, the share of the same-traffic roofline of fastradam and its peers.

One horizontal bar group per case (fastradam's, and each peer's measured in the same run), the
roofline drawn at 1.0, and fastradam's share and speedups written beside its bar, so a reader
sees at a glance how close to the memory roofline each case runs and by how much it beats the
peers. It takes the report's :class:`fastradam.bench.report.Case` objects (anything with
``label``, ``share``, ``peer_shares`` and ``speedups``); matplotlib (Agg) is imported only when
a figure is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

#: Bar order, label and colour of each implementation.
SERIES = (("fastradam", "fastradam", "#1f77b4"), ("torch_adam_fused", "torch Adam (fused)", "#ff7f0e"),
          ("torch_radam_foreach", "torch RAdam (foreach)", "#7f7f7f"))
SHORT = {"torch_adam_fused": "Adam fused", "torch_radam_foreach": "RAdam foreach"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _annotation(case: Any) -> str:
    speedups = [f"{case.speedups[p]:.2f}x {SHORT[p]}" for p, _, _ in SERIES[1:] if p in case.speedups]
    return f"{case.share:.2f}" + (f"   ({', '.join(speedups)})" if speedups else "")


def summary_plot(cases: Sequence[Any], title: str, path: Path) -> Path | None:
    """Write the figure of ``cases`` (those with a roofline share) to ``path``; None if none has one.

    Each case gets one bar per implementation measured beside it (fastradam first), so cases
    without peers take one row and cases with both peers three."""
    shown = [c for c in cases if c.share is not None]
    if not shown:
        return None
    plt = _pyplot()
    bar, gap = 0.8, 0.7
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.2 * sum(1 + len(c.peer_shares) for c in shown) + 0.14 * len(shown)),
                           dpi=90)
    y, ticks, labelled = 0.0, [], set()
    for case in shown:
        bars = [(name, label, colour, case.share if name == "fastradam" else case.peer_shares[name])
                for name, label, colour in SERIES if name == "fastradam" or name in case.peer_shares]
        ticks.append(y + bar * (len(bars) - 1) / 2)
        for name, label, colour, value in bars:
            ax.barh(y, value, bar, color=colour, label=None if name in labelled else label)
            labelled.add(name)
            if name == "fastradam":
                ax.text(value + 0.01, y, _annotation(case), va="center", fontsize=8)
            y += bar
        y += gap
    ax.axvline(1.0, color="k", ls="--", lw=1, label="same-traffic roofline")
    ax.set_yticks(ticks, [c.label for c in shown], fontsize=9)
    ax.set_ylim(y - gap + bar / 2, -bar)
    ax.set_xlim(0, max(1.7, 1.35 * max(c.share for c in shown)))
    ax.set_xlabel("share of the same-traffic roofline (its time / this time; 1.0 = at the memory roofline)")
    ax.set_title(f"{title}\nshare of the roofline per case; beside fastradam's bar: its share and its speedup "
                 "over each peer", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.55 / max(fig.get_figheight() - 1.4, 1.0)),
              ncol=4, frameon=False)  # below the axis label, ~0.55 inch down whatever the height
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
