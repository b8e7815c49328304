"""The bf16-parameter study in quick mode: it runs every arm this build takes, writes its outputs,
and its numbers are finite; and the arms are wired to the options they name."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

import torch  # noqa: E402

from fastradam.study.bf16 import PARAM_ARMS  # noqa: E402
from fastradam.study.bf16.__main__ import main, quick  # noqa: E402
from fastradam.study.bf16.arms import Bf16Params  # noqa: E402
from fastradam.study.charlm import ALPHABET, CONTEXT, load_charlm_split  # noqa: E402


def test_quick_bf16_study_writes_finite_results(tmp_path):
    assert main(["--quick", "--threads", "1", "--out", str(tmp_path)]) == 0

    for name in ("report.md", "bf16_params.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "results.json").read_text())
    configs, limits = quick()
    arms = [a for a in PARAM_ARMS if a.available()]
    assert {a.name for a in arms} >= {"fp32", "nearest"}
    for task, config in configs.items():
        runs = results["tasks"][task]["runs"]
        assert len(runs) == len(arms) * len(config.lrs) * len(config.seeds)
        for run in runs:
            assert not run["diverged"] and len(run["test_loss"]) == config.epochs
            numbers = [run["final_train_loss"], run["frozen"], run["stalled"], *run["test_loss"]]
            assert all(math.isfinite(v) for v in numbers), run
            assert 0 <= run["frozen"] <= 1 and 0 <= run["stalled"] <= 1
            assert run["moments"] in ("float32", "bfloat16")
            if run["optimizer"] == "remainders":
                assert run["diverges_at"] >= 0 and 0 <= run["differ"] <= 1
        # round-to-nearest bf16 loses most updates at lr 1e-4: far more elements stay put than in fp32
        frozen = {(r["optimizer"], r["lr"]): r["frozen"] for r in runs}
        assert frozen[("nearest", 1e-4)] > frozen[("fp32", 1e-4)] + 0.3

    report = (tmp_path / "report.md").read_text()
    assert "Where each arm hurts" in report and "Kahan" in report and "nan" not in report
    for arm in arms:
        assert arm.label in report

    (tmp_path / "report.md").unlink()
    assert main(["--render-only", "--out", str(tmp_path)]) == 0
    assert "Where each arm hurts" in (tmp_path / "report.md").read_text()


def test_bf16_model_holds_bf16_and_computes_from_its_exact_values():
    torch.manual_seed(0)
    reference = torch.nn.Linear(4, 3)
    model = Bf16Params(torch.nn.Linear(4, 3))
    model.module.load_state_dict(reference.state_dict())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    x = torch.randn(5, 4)
    exact = torch.nn.functional.linear(x, reference.weight.bfloat16().float(), reference.bias.bfloat16().float())
    out = model(x)
    assert out.dtype == torch.float32 and torch.equal(out, exact)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())


def test_charlm_split_is_fixed_and_in_range():
    x_train, y_train, x_test, y_test = load_charlm_split()
    assert x_train.shape[1] == CONTEXT and len(x_train) == len(y_train) >= 9 * len(x_test) > 0
    assert 0 <= int(x_train.min()) and int(max(x_train.max(), y_test.max())) < len(ALPHABET)
    # a window's target is the next window's last context character (within a block)
    assert int(y_train[0]) == int(x_train[1, -1])


def test_arms_pass_the_options_they_name():
    options = {a.name: a.options(7) for a in PARAM_ARMS}
    assert options["fp32"] == options["nearest"] == {}
    assert options["master"] == {"master_weights": True}
    assert options["remainders"] == {"master_weights": True, "store_param_remainders": True}
    assert options["stochastic"]["bf16_stochastic_round"] is True
    assert [a.keeper_bytes for a in PARAM_ARMS] == [0, 4, 2, 0, 0]


def test_remainders_arm_keeps_the_master_arms_master_bit_for_bit():
    """Given the same gradients, the remainders arm's bf16 params and int16 remainders decode to the
    fp32-master arm's master exactly (the premise of comparing the two arms' runs)."""
    from fastradam.study.bf16.arms import param_arm

    torch.manual_seed(0)
    start = torch.randn(257) * 0.05
    params = {name: torch.nn.Parameter(start.bfloat16()) for name in ("master", "remainders")}
    optimizers = {name: param_arm(name).build([p], 1e-3, 0) for name, p in params.items()}
    for _ in range(20):
        grad = torch.randn(257).bfloat16()
        for name, p in params.items():
            p.grad = grad.clone()
            optimizers[name].step()
    master = optimizers["master"].state[params["master"]]["master_param"]
    remainder = optimizers["remainders"].state[params["remainders"]]["master_param"].int()
    high = (params["remainders"].detach().view(torch.int16).int() & 0xFFFF) - (remainder < 0).int()
    decoded = ((high << 16) | (remainder & 0xFFFF)).view(torch.float32)
    assert master.dtype == torch.float32 and torch.equal(decoded.view(torch.int32), master.view(torch.int32))
