"""The command line's refusals: one line naming what to change, before any work is done."""
import pytest
import torch

from mlifast.cli import main
from mlifast.models import mlp


@pytest.fixture
def checkpoints(tmp_path):
    paths = {}
    for name, seed, hidden in (("init", 0, (8,)), ("init2", 1, (8,)), ("end", 2, (8,)), ("other", 3, (4,))):
        torch.manual_seed(seed)
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(mlp(hidden=hidden).state_dict(), paths[name])
    paths["wrapped"] = tmp_path / "wrapped.pt"
    torch.save({"state_dict": torch.load(paths["init"]), "epoch": 3}, paths["wrapped"])
    paths["garbage"] = tmp_path / "garbage.pt"
    paths["garbage"].write_text("not a checkpoint")
    paths["a_file"] = tmp_path / "a_file"
    paths["a_file"].write_text("")
    return paths


def refusal(capsys, *args) -> str:
    """The one line `mlifast ARGS` writes to stderr as it exits with status 2."""
    try:
        status = main([str(a) for a in args])
    except SystemExit as stop:  # (argparse's own)
        status = stop.code
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "error:" in lines[-1]
    return lines[-1]


def curve(p, **change):
    args = {"--model": "mlifast.models:mlp", "--model-args": '{"hidden": [8]}', "--data": "no-such-data",
            "--start": p["init"], "--end": p["end"], "--out": p["init"].parent / "out", **change}
    return ["curve", *(x for pair in args.items() for x in pair), "--no-progress"]


@pytest.mark.parametrize("change, said", [
    (lambda p: {"--out": p["a_file"]}, "cannot be an output folder"),
    (lambda p: {"--end": p["wrapped"]}, "its state dict may be the one under 'state_dict'"),
    (lambda p: {"--end": p["garbage"]}, "is not a checkpoint of tensors torch.load can read"),
    (lambda p: {"--model-args": '{"hiden": [8]}'}, "unexpected keyword argument 'hiden'"),
    (lambda p: {"--model-args": "[8]"}, "--model-args must be a JSON object"),
    (lambda p: {"--model": "mlifast:__version__"}, "is not callable"),
    (lambda p: {"--alphas": "1:0:5"}, "a < b"),
    (lambda p: {"--alphas": "1.5:3:4"}, "fewer than 2 points in [0, 1]"),
])
def test_curve_refuses_before_evaluating(capsys, checkpoints, change, said):
    assert said in refusal(capsys, *curve(checkpoints, **change(checkpoints)))


def test_surface_and_reproduce_refuse_what_they_cannot_draw(capsys, checkpoints, tmp_path):
    p = checkpoints
    surface = ["surface", "--model", "mlifast.models:mlp", "--model-args", '{"hidden": [8]}', "--data", "no-such-data",
               "--init", p["init"], "--init2", p["init2"], "--end", p["end"], "--out", tmp_path / "surface"]
    assert "must be at least 2" in refusal(capsys, *surface, "--steps", "1")
    mismatched = [p["other"] if a == p["end"] else a for a in surface]
    assert f"{p['other']} does not match --init" in refusal(capsys, *mismatched)
    assert "must be at least 2" in refusal(capsys, "reproduce", "mlp", "--alphas", "1", "--out", tmp_path / "r")
    for lrs in ("a,b", "0.1,nan", "-1"):
        said = refusal(capsys, "reproduce", "mlp", "--lrs", lrs, "--out", tmp_path / "r")
        assert "comma-separated positive numbers" in said
    assert "unknown data set(s) ['foo']" in refusal(capsys, "reproduce", "mlp", "--datasets", "foo", "--out",
                                                     tmp_path / "r")
    assert not (tmp_path / "r" / "config.json").exists()
