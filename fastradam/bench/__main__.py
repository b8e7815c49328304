"""The main job: ``python -m fastradam.bench`` runs the benchmark suite and prints the report.

It runs the pytest-benchmark suite in the source tree's ``bench/`` folder (CPU by default;
GPU cases run too where a CUDA device is present), with pytest's progress visible, then
prints the report of :mod:`fastradam.bench.report` (this machine first) and writes it as
Markdown, with the figures of :mod:`fastradam.bench.plots`, beside the JSON. The other
machines' results committed under ``bench/results/*.json`` follow in their own section unless
``--no-committed-results`` (a committed device this run measured itself is left out).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from fastradam.bench import report


def suite_dir() -> Path:
    """The ``bench/`` folder of the source tree this package was imported from."""
    folder = Path(__file__).resolve().parents[2] / "bench"
    if not (folder / "conftest.py").is_file():
        raise SystemExit(
            "fastradam.bench: the benchmark suites live in the source tree's bench/ folder, "
            f"not found at {folder}; install from a clone (pip install -e '.[bench]')"
        )
    return folder


def _devices(path: Path) -> set[str]:
    data = json.loads(path.read_text())
    return {b.get("extra_info", {}).get("device") for b in data.get("benchmarks", [])} - {None}


def committed_results(bench: Path, fresh: Path) -> list[Path]:
    """``bench/results/*.json`` whose devices this run did not measure itself (printed as it goes)."""
    measured = _devices(fresh)
    chosen = []
    for path in sorted((bench / "results").glob("*.json")):
        if path.resolve() == fresh.resolve():
            continue
        if _devices(path) & measured:
            print(f"leaving out {path}: this run measured the same device", flush=True)
            continue
        print(f"adding committed results {path}", flush=True)
        chosen.append(path)
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastradam.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full matrix: float64, the slow torch loop at every size")
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="folder for results.json, report.md and the plots (default: ./bench-results)")
    parser.add_argument("-k", dest="keyword", help="only benchmarks matching this pytest -k expression")
    parser.add_argument("--no-committed-results", "--no-gpu-results", dest="no_committed_results",
                        action="store_true",
                        help="leave the other machines' results committed under bench/results/ out of the report")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG figures (no matplotlib needed)")
    args = parser.parse_args(argv)

    bench = suite_dir()
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "results.json"
    command = [sys.executable, "-m", "pytest", str(bench), "-v", "-p", "no:cacheprovider",
               f"--rootdir={bench}", f"--benchmark-json={json_path}", "--benchmark-columns=median,rounds"]
    if args.full:
        command.append("--full")
    if args.keyword:
        command += ["-k", args.keyword]
    print("running:", " ".join(command), flush=True)
    start = time.perf_counter()
    status = subprocess.call(command)
    if status != 0:
        return status
    print(f"benchmarks done in {time.perf_counter() - start:.0f} s; building the report", flush=True)
    sources = [json_path] + ([] if args.no_committed_results else committed_results(bench, json_path))
    report_args = [*map(str, sources), "--markdown", str(args.out / "report.md")]
    report.main(report_args + (["--no-plots"] if args.no_plots else []))
    written = [json_path, args.out / "report.md"] + sorted(args.out.glob("*.png"))
    print("\nwritten: " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
