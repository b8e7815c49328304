"""``python -m fastradam.study.bf16``: train the bf16 arms on digits and the character LM, write the report.

Writes report.md, bf16_params.png and results.json to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from fastradam.study.bf16.arms import PARAM_ARMS
from fastradam.study.bf16.report import plot, render
from fastradam.study.bf16.train import Limits, load, run_grid, save
from fastradam.study.charlm import CHARLM, corpus_digest
from fastradam.study.digits import DIGITS
from fastradam.study.results import Config

TASKS = {"digits": DIGITS, "charlm": CHARLM}
#: The learning rates: from where round-to-nearest bf16 is expected to stall up to the tasks' best.
LRS = (1e-4, 3e-4, 1e-3, 1e-2)
CONFIGS = {"digits": Config(lrs=LRS), "charlm": Config(lrs=LRS, epochs=1, batch_size=128)}


def quick() -> tuple[dict[str, Config], Limits]:
    """Seconds: two lrs, two seeds, one epoch of 12 steps per task, the training loss over 1024 examples."""
    return {name: dataclasses.replace(c, lrs=(1e-4, 1e-2), seeds=(0, 1), epochs=1, curve_steps=12)
            for name, c in CONFIGS.items()}, Limits(12, 1024)


def set_threads(threads: int) -> None:
    """``threads`` for torch and for numba (numba's OpenMP layer would otherwise reset torch's count
    to numba's at its first parallel launch, and the step's kernels would run on every core)."""
    import numba
    import torch

    torch.set_num_threads(threads)
    numba.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m fastradam.study.bf16", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two lrs, two seeds, 12 steps per task (for tests)")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 5)")
    parser.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=tuple(TASKS))
    parser.add_argument("--out", type=Path, default=Path("study-results/bf16"),
                        help="folder for report.md, the PNG and results.json (default: ./study-results/bf16)")
    parser.add_argument("--render-only", action="store_true",
                        help="rebuild report.md and the PNG from OUT/results.json without training")
    parser.add_argument("--threads", type=int, help="torch's and numba's thread count (default: their own)")
    args = parser.parse_args(argv)
    if args.threads:
        set_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        done, command, seconds, limits, threads = load(args.out / "results.json")
        set_threads(threads)  # the report's machine line names the runs' thread count
    else:
        configs, limits = quick() if args.quick else (CONFIGS, Limits())
        if args.seeds:
            configs = {n: dataclasses.replace(c, seeds=tuple(range(args.seeds))) for n, c in configs.items()}
        arms = tuple(a for a in PARAM_ARMS if a.available())
        missing = [a.label for a in PARAM_ARMS if a not in arms]
        if missing:
            print(f"left out (this build of fastradam.torch.RAdam does not take their options): {', '.join(missing)}")
        given = argv if argv is not None else sys.argv[1:]
        command = "python -m fastradam.study.bf16" + (" " + " ".join(given)).rstrip()
        start = time.perf_counter()
        done = {name: (configs[name], run_grid(name, TASKS[name], arms, configs[name], limits,
                                               progress=lambda line: print(line, flush=True)))
                for name in args.tasks}
        seconds = time.perf_counter() - start
        import torch

        save(args.out / "results.json", done, command, seconds, limits, torch.get_num_threads())
    tasks = {name: (TASKS[name], config, runs) for name, (config, runs) in done.items()}
    plot(tasks, args.out)
    extra = [f"- The language model's text: SHA-256 `{corpus_digest()}…` of its characters."
             ] if "charlm" in tasks else []
    (args.out / "report.md").write_text(render(tasks, command, seconds, limits, extra))
    print(f"written: {args.out / 'report.md'}, bf16_params.png, results.json ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
