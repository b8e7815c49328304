"""The main job: ``python -m fastradam.bench`` runs the benchmark suite and prints the report.

It runs the pytest-benchmark suite in the source tree's ``bench/`` folder (CPU by default;
GPU cases run too where a CUDA device is present), with pytest's progress visible, then
prints the table of ``bench/report.py`` and writes it as Markdown beside the JSON.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def suite_dir() -> Path:
    """The ``bench/`` folder of the source tree this package was imported from."""
    folder = Path(__file__).resolve().parent.parent / "bench"
    if not (folder / "report.py").is_file():
        raise SystemExit(
            "fastradam.bench: the benchmark suites live in the source tree's bench/ folder, "
            f"not found at {folder}; install from a clone (pip install -e '.[bench]')"
        )
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastradam.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full matrix: float64, the slow torch loop at every size")
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="folder for results.json and report.md (default: ./bench-results)")
    parser.add_argument("-k", dest="keyword", help="only benchmarks matching this pytest -k expression")
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
    status = subprocess.call(command)
    if status != 0:
        return status
    sys.path.insert(0, str(bench))
    import report

    report.main([str(json_path), "--markdown", str(args.out / "report.md")])
    print(f"\nwritten: {json_path}, {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
