"""The demo on a subset: its curves agree with the one-point-at-a-time loop on its checkpoints."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mlifast

from mlifast.datasets import DatasetNotFoundError, mnist
from mlifast.experiments.demo import DemoConfig, run_demo
from mlifast.models import mlp

try:
    DATA = mnist()
except DatasetNotFoundError as error:  # pragma: no cover - make test installs it
    pytest.skip(f"MNIST missing: {error}", allow_module_level=True)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    config = DemoConfig(hidden=(32, 32), alphas=6, n_train=600, n_test=200, batch_size=50, eval_batch_size=128,
                        progress=False, out=out)
    return run_demo(config), out


def loop_curve(state_start, state_end, x, y, alphas):
    model = mlp(hidden=(32, 32))
    losses, accs = [], []
    for a in alphas:
        model.load_state_dict({k: state_start[k] + a * (state_end[k] - state_start[k]) for k in state_start})
        with torch.no_grad():
            out = model.eval()(x)
        losses.append(F.cross_entropy(out, y).item())
        accs.append((out.argmax(1) == y).float().mean().item())
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(accs, dtype=torch.float64)


def test_sgd_curve_matches_loop_on_saved_checkpoints(demo_run):
    (result, _, curves), out = demo_run
    init, sgd = torch.load(out / "init.pt"), torch.load(out / "sgd.pt")
    alphas = curves["sgd"]["train"].alphas.tolist()
    data = DATA.subset(600, 200)
    for split, (x, y) in (("train", data.split("train")), ("test", data.split("test"))):
        losses, accs = loop_curve(init, sgd, x, y, alphas)
        torch.testing.assert_close(curves["sgd"][split]["loss"], losses, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(curves["sgd"][split]["accuracy"], accs, rtol=0, atol=1e-6)


def test_outputs_written(demo_run):
    (result, reports, _), out = demo_run
    for name in ("init.pt", "sgd.pt", "adam.pt", "results.json", "report.md", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["runs"]) == {"sgd", "adam"}
    assert saved["runs"]["adam"]["report"]["delta_min"] == pytest.approx(reports["adam"].delta_min)
    assert mlp(hidden=(32, 32)).load_state_dict(torch.load(out / "adam.pt"))
    assert "Δ_min" in (out / "report.md").read_text()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mlifast", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args", [["demo", "--alphas", "0"], ["demo", "--hidden", "a,b"], ["nonsense"],
                                  ["demo", "--dataset", "cifar"]])
def test_cli_misuse_exits_2_with_one_line(args):
    done = run_cli(*args)
    assert done.returncode == 2
    assert "error:" in done.stderr.strip().splitlines()[-1]


def test_curve_command_reproduces_the_demo_curve(demo_run, tmp_path):
    (_, _, curves), out = demo_run
    done = run_cli("curve", "--model", "mlifast.models:mlp", "--model-args", '{"hidden": [32, 32]}',
                   "--start", str(out / "init.pt"), "--end", str(out / "sgd.pt"), "--data", "mnist",
                   "--limit", "600", "--alphas", "6", "--batch-size", "128", "--out", str(tmp_path), "--no-progress")
    assert done.returncode == 0, done.stderr
    res = mlifast.load(tmp_path / "results.json")
    torch.testing.assert_close(res["loss"], curves["sgd"]["train"]["loss"], rtol=1e-6, atol=1e-7)
    assert "Δ_min" in done.stdout


@pytest.mark.parametrize("change, message", [
    (lambda a, out: a.__setitem__(a.index("--start") + 1, str(out / "missing.pt")), "does not exist"),
    (lambda a, out: a.__setitem__(a.index("--data") + 1, "cifar10"), "unknown data set"),
    (lambda a, out: a.__setitem__(a.index("--model-args") + 1, '{"hidden": [16]}'), "does not match"),
])
def test_curve_misuse_is_one_line_and_exit_2(demo_run, change, message):
    _, out = demo_run
    args = ["curve", "--model", "mlifast.models:mlp", "--model-args", '{"hidden": [32, 32]}', "--start",
            str(out / "init.pt"), "--end", str(out / "sgd.pt"), "--data", "mnist", "--limit", "10", "--no-progress"]
    change(args, out)
    done = run_cli(*args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
