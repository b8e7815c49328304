"""Turn pytest-benchmark JSON into the fastradam report: roofline share and speedups per case.

The rows and the figures derived from them come from :mod:`fastradam.bench.results`; the
figures, from :mod:`fastradam.bench.plots`.

The report leads with the machine of the first JSON (this run's): one line per fastradam case
with its share of the same-traffic roofline and its speedup over each peer, one figure of the
same, then the full table. The devices of the other JSON files (committed results of other
machines) follow in a section of their own, each with its summary and figure.

Usage: ``python -m fastradam.bench.report RESULTS.json [OTHER_MACHINES.json ...] [--markdown REPORT.md] [--no-plots]``
(the figures go beside the Markdown file).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastradam.bench.plots import summary_plot
from fastradam.bench.results import COMPARED_PEERS, Row, bandwidth_unit, derived, rows_from_json


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
    """The full table of one device's rows, one line per benchmark, grouped by dtype and size."""
    lines = [
        "| dtype | N | tensors | implementation | median ms | throughput | share of same-traffic | "
        "share of flat fastradam | vs torch Adam fused | vs torch RAdam foreach |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sorted(rows, key=lambda r: (r.dtype, r.n, r.tensors, r.median_s)):
        d = derived(row, rows)
        share = d.get("share_of_same_traffic")
        flat = d.get("share_of_flat")
        lines.append(
            f"| {row.dtype} | {row.n:,} | {row.tensors} | {row.implementation} | "
            f"{row.median_s * 1e3:.3f} | {throughput(row)} | "
            f"{'' if share is None else f'{share:.2f}'} | {'' if flat is None else f'{flat:.2f}'} | "
            f"{_ratio(d.get('speedup_vs_torch_adam_fused'))} | {_ratio(d.get('speedup_vs_torch_radam_foreach'))} |"
        )
    return "\n".join(lines)


#: How a fastradam variant's implementation name reads in a case label.
VARIANTS = {"fastradam": "", "fastradam_graph": "CUDA graph replay", "fastradam_check_finite": "check_finite",
            "fastradam_4_groups": "4 groups", "fastradam_tensor_list": "tensor list",
            "fastradam_torch": "fastradam.torch.RAdam", "fastradam_torch_fresh_grads": "fastradam.torch.RAdam, fresh grads",
            "fastradam_torch_copy_grads": "fastradam.torch.RAdam, grads copied",
            "fastradam_torch_capturable": "fastradam.torch.RAdam, capturable"}


def _size(n: int) -> str:
    return f"{n / 2**20:g}M" if n % 2**18 == 0 else f"{n:,}"


@dataclass(frozen=True)
class Case:
    """One fastradam measurement with what it is judged by: its share of the same-traffic kernel
    and each peer's (where measured), and its speedup over each peer."""

    label: str
    row: Row
    share: float | None
    peer_shares: dict[str, float]
    speedups: dict[str, float]


#: The variants the figure shows (the summary table has every one).
HEADLINE = ("fastradam", "fastradam_graph", "fastradam_torch")


def _case_order(row: Row) -> tuple:
    """float32 first, then the 16-bit storages by bytes per element, float64 last; flat before splits."""
    kind = 2 if row.dtype == "float64" else 0 if row.dtype in ("float32", "fp32/fp32/fp32") else 1
    return (kind, -row.bytes_per_element, row.dtype, row.tensors != "flat", row.tensors, row.n,
            row.implementation not in HEADLINE, row.implementation)


def cases(rows: list[Row]) -> list[Case]:
    """The fastradam rows of ``rows`` (one device) as cases: float32 first, flat before splits."""
    out = []
    for row in sorted(rows, key=_case_order):
        if not row.implementation.startswith("fastradam"):
            continue
        d = derived(row, rows)
        share = d.get("share_of_same_traffic")
        speedups = {peer: d[f"speedup_vs_{peer}"] for peer in COMPARED_PEERS if f"speedup_vs_{peer}" in d}
        # a peer's share is roofline / peer time = (roofline / ours) / (peer / ours)
        peer_shares = {} if share is None else {peer: share / speedup for peer, speedup in speedups.items()}
        parts = [row.dtype, _size(row.n)] + ([] if row.tensors == "flat" else [f"as {row.tensors}"])
        variant = VARIANTS.get(row.implementation, row.implementation.replace("_", " "))
        out.append(Case(" ".join(parts) + (f", {variant}" if variant else ""), row, share, peer_shares, speedups))
    return out


def summary_table(device_cases: list[Case]) -> str:
    """One line per case: time, throughput, share of the same-traffic kernel, speedup over each peer."""
    lines = ["| case | bytes/element | fastradam ms | throughput | share of same-traffic | "
             "vs torch Adam (fused) | vs torch RAdam (foreach) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for case in device_cases:
        share = "" if case.share is None else f"{case.share:.2f}"
        lines.append(f"| {case.label} | {case.row.bytes_per_element} | {case.row.median_s * 1e3:.3f} | "
                     f"{throughput(case.row)} | {share} | {_ratio(case.speedups.get('torch_adam_fused'))} | "
                     f"{_ratio(case.speedups.get('torch_radam_foreach'))} |")
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


LEGEND = ("Medians of pytest-benchmark rounds. Share of same-traffic = the same-traffic kernel's time / this time "
          "(1.00 = at the machine's in-place memory roofline: the same bytes read and written with trivial "
          "arithmetic); vs a peer = the peer's time / fastradam's (above 1x: fastradam is faster); throughput = "
          "bytes moved per element x N / time (GB/s on a CPU, TB/s on a GPU).")


def _slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def _devices(rows: list[Row]) -> list[str]:
    return sorted({r.device for r in rows}, key=lambda d: (d.startswith("gpu"), d))


def _figure(device_cases: list[Case], title: str, path: Path | None, relative_to: Path | None) -> list[str]:
    """The Markdown lines of the device's figure (written to ``path``), or of why there is none."""
    if path is None:
        return []
    try:
        written = summary_plot([c for c in device_cases if c.row.implementation in HEADLINE], title, path)
    except ImportError as error:  # matplotlib missing
        return [f"(no figure: {error})", ""]
    if written is None:
        return []
    link = written.relative_to(relative_to) if relative_to else written
    return [f"![{title}]({link.as_posix()})", ""]


def render(paths: list[Path], plots: Path | None = None, relative_to: Path | None = None) -> str:
    """The Markdown report: the first JSON document's devices (this machine) first, each with its
    summary, figure and full table; the other documents' devices after, under "Other machines".

    With ``plots`` (a folder), each device's figure (:mod:`fastradam.bench.plots`) is written
    there and linked, relative to ``relative_to`` (the Markdown file's folder) when given.
    Without matplotlib the report says so and has no figures.
    """
    documents = [(Path(p), json.loads(Path(p).read_text())) for p in paths]
    lines = ["# fastradam benchmark report", "", LEGEND, ""]
    figures: set[str] = set()
    for index, (path, doc) in enumerate(documents):
        rows = rows_from_json(doc)
        if index == 0 and not rows:
            lines += [f"## This machine: no fastradam benchmarks in {path.name}", ""]
        if index == 1:
            lines += ["## Other machines (committed results)", "",
                      "Recorded on other machines and committed under `bench/results/`; each is compared only with "
                      "its own roofline and peers, measured in the same run.", ""]
        for position, device in enumerate(_devices(rows)):
            here = [r for r in rows if r.device == device]
            device_cases = cases(here)
            heading = "## This machine: " if index == 0 else "### "
            name = "this-machine" if index == position == 0 else _slug(device)
            while name in figures:  # the same device in two documents: one figure each
                name += "-2"
            figures.add(name)
            figure = None if plots is None else plots / f"{name}.png"
            lines += [f"{heading}{device}", "", *machine_lines(doc, path.name), "", summary_table(device_cases), "",
                      *_figure(device_cases, device, figure, relative_to)]
            if index == 0:
                lines += ["Every measurement of this machine:", "", markdown_table(here), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON files")
    parser.add_argument("--markdown", type=Path, help="also write the report to this file, and its figures beside it")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG figures")
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
