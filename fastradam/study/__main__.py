"""``python -m fastradam.study``: train every arm on the digits task, write report.md, the PNGs and results.json."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from fastradam.study.arms import ARMS
from fastradam.study.digits import DIGITS
from fastradam.study.findings import comparisons
from fastradam.study.plots import plot
from fastradam.study.report import render
from fastradam.study.results import Config, load_results, save_results
from fastradam.study.train import run_study


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m fastradam.study", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two lrs, two seeds, two epochs (seconds; for tests)")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 5)")
    parser.add_argument("--epochs", type=int, help="epochs per run (default 30)")
    parser.add_argument("--out", type=Path, default=Path("study-results"),
                        help="folder for report.md, the PNGs and results.json (default: ./study-results)")
    parser.add_argument("--render-only", action="store_true",
                        help="rebuild report.md and the PNGs from OUT/results.json without training")
    parser.add_argument("--threads", type=int,
                        help="call torch.set_num_threads(N) first (default: torch's own choice)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        runs, config, command, seconds = load_results(args.out / "results.json")
    else:
        config = Config.quick() if args.quick else Config()
        if args.seeds:
            config = dataclasses.replace(config, seeds=tuple(range(args.seeds)))
        if args.epochs:
            config = dataclasses.replace(config, epochs=args.epochs)
        command = "python -m fastradam.study" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
        print(f"{len(ARMS) * len(config.lrs) * len(config.seeds)} runs: {len(ARMS)} optimizers x "
              f"{len(config.lrs)} lrs x {len(config.seeds)} seeds, {config.epochs} epochs each", flush=True)
        start = time.perf_counter()
        runs = run_study(DIGITS, config, progress=lambda line: print(line, flush=True))
        seconds = time.perf_counter() - start
        save_results(args.out / "results.json", runs, config, command, seconds)
    plot(runs, config, args.out)
    (args.out / "report.md").write_text(render(DIGITS, runs, config, command, seconds))
    print("\n" + "\n".join(comparisons(runs, config)))
    print(f"\nwritten: {args.out / 'report.md'}, lr_robustness.png, early_steps.png, results.json "
          f"({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
