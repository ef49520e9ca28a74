"""The Figure-1 slice: plane identities, trajectory projection, and the CLI against the loop."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mlifast
from mlifast.experiments.surface import project, slice_plane
from mlifast.models import mlp
from oracle import load_point


def states(batch_norm=False):
    out = []
    for seed in range(3):
        torch.manual_seed(seed)
        out.append({k: v.clone() for k, v in mlp(hidden=(8,), batch_norm=batch_norm).double().state_dict().items()})
    return out


def close(a, b, tol=1e-10):
    return all(torch.allclose(a[k].double(), b[k].double(), atol=tol) for k in b if b[k].is_floating_point())


@pytest.mark.parametrize("batch_norm", [False, True])
def test_corners_of_the_slice(batch_norm):
    init, init2, end = states(batch_norm)
    plane, (c, one) = slice_plane(init, init2, end)
    assert one == 1.0
    assert close(plane.state_at([0.0, 0.0]), init)
    assert close(plane.state_at([1.0, 0.0]), end)
    assert close(plane.state_at([c, 1.0]), init2)


def test_projection_recovers_coordinates():
    init, init2, end = states()
    plane, _ = slice_plane(init, init2, end)
    a, b = project(plane, plane.state_at([0.37, -0.21]))
    assert a == pytest.approx(0.37, abs=1e-10) and b == pytest.approx(-0.21, abs=1e-10)


def test_degenerate_slices_are_refused():
    init, init2, end = states()
    with pytest.raises(ValueError, match="equal the initialisation"):
        slice_plane(init, init2, init)
    midpoint = {k: (init[k] + end[k]) / 2 if init[k].is_floating_point() else init[k] for k in init}
    with pytest.raises(ValueError, match="lies on the line"):
        slice_plane(init, midpoint, end)


def test_surface_command_matches_loop(tmp_path):
    pytest.importorskip("mnist")
    init, init2, end = (dict((k, v.float()) for k, v in s.items()) for s in states())
    trajectory_point = {k: init[k] + 0.5 * (end[k] - init[k]) for k in init}
    paths = {}
    for name, state in (("init", init), ("init2", init2), ("end", end), ("mid", trajectory_point)):
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(state, paths[name])
    done = subprocess.run(
        [sys.executable, "-m", "mlifast", "surface", "--model", "mlifast.models:mlp", "--model-args",
         '{"hidden": [8]}', "--data", "mnist", "--limit", "300", "--init", str(paths["init"]), "--init2",
         str(paths["init2"]), "--end", str(paths["end"]), "--trajectory", str(paths["mid"]), "--steps", "3",
         "--out", str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    res = mlifast.load(tmp_path / "out" / "results.json")
    assert res.coords.shape == (9, 2) and (tmp_path / "out" / "surface.png").stat().st_size > 0
    assert res.meta["trajectory"][0] == pytest.approx([0.5, 0.0], abs=1e-6)
    plane, _ = slice_plane(init, init2, end)
    x, y = mlifast.datasets.mnist().split("train")
    x, y = x[:300], y[:300]
    for k in (0, 4, 8):
        model = load_point(mlp(hidden=(8,)), plane, res.coords[k].tolist()).eval()
        with torch.no_grad():
            assert res["loss"][k].item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-5)
