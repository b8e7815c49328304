"""The RAdam-vs-Adam study in quick mode: it runs, writes its outputs, and its numbers are finite."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from fastradam import study  # noqa: E402
from fastradam.study.__main__ import main  # noqa: E402


def test_quick_study_writes_finite_results(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0

    for name in ("report.md", "lr_robustness.png", "early_steps.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "results.json").read_text())
    config = study.Config.quick()
    runs = results["runs"]
    assert len(runs) == len(study.ARMS) * len(config.lrs) * len(config.seeds)
    for run in runs:
        assert not run["diverged"]
        assert len(run["test_accuracy"]) == config.epochs
        numbers = run["train_loss"] + run["test_accuracy"] + run["test_loss"]
        assert all(math.isfinite(v) for v in numbers), run
        assert 0 <= run["test_accuracy"][-1] <= 100

    report = (tmp_path / "report.md").read_text()
    assert "Where RAdam loses" in report and "nan" not in report
    for arm in study.ARMS:
        assert arm.label in report

    (tmp_path / "report.md").unlink()
    assert main(["--render-only", "--out", str(tmp_path)]) == 0
    assert "Where RAdam loses" in (tmp_path / "report.md").read_text()


def test_optimizers_take_the_intended_learning_rates():
    """Warmup arms start at lr / warmup steps; plain arms at lr (the schedules are wired right)."""
    import torch

    lr, total, proportion = 1e-2, 100, 0.1
    seen = {}
    for arm in study.ARMS:
        parameter = torch.nn.Parameter(torch.zeros(3))
        optimizer, scheduler = arm.build([parameter], lr, total, proportion)
        rates = []
        for _ in range(12):
            parameter.grad = torch.ones(3)
            before = parameter.detach().clone()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            rates.append((before - parameter.detach()).abs().max().item())
        seen[arm.name] = rates
    assert type(study.arm("radam").build([torch.nn.Parameter(torch.zeros(1))], lr, total, proportion)[0]
                ).__module__ == "fastradam.torch"
    # step 1 of Adam and RAdam (below the rectification threshold) moves by exactly lr_t
    assert seen["adam"][0] == pytest.approx(lr, rel=1e-4)
    assert seen["radam"][0] == pytest.approx(lr, rel=1e-4)
    assert seen["adam_warmup"][0] == pytest.approx(lr / 10, rel=1e-4)
    assert seen["radam_keras"][0] == pytest.approx(lr / 10, rel=1e-4)
    # after the 10 warmup steps, Adam + warmup moves like Adam
    assert seen["adam_warmup"][11] == pytest.approx(seen["adam"][11], rel=1e-4)
