"""Figures of results: a plane's values placed by their coordinates, whatever their order."""
import pytest
import torch

from mlifast.engine.plotting import plane_grid
from mlifast.engine.results import Results


def f(coords):
    return coords[:, 0] + 100 * coords[:, 1]


@pytest.mark.parametrize("order", ["first slowest", "second slowest", "shuffled"])
def test_plane_values_are_placed_by_their_coordinates(order):
    a, b = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), torch.tensor([0.0, 10.0], dtype=torch.float64)
    coords = torch.cartesian_prod(a, b) if order == "first slowest" else torch.cartesian_prod(b, a).flip(1)
    if order == "shuffled":
        coords = coords[torch.randperm(6, generator=torch.Generator().manual_seed(0))]
    got_a, got_b, placed = plane_grid(coords, f(coords))
    assert torch.equal(got_a, a) and torch.equal(got_b, b)
    assert torch.equal(placed, b[:, None] * 100 + a[None, :])  # placed[j, i] = f(a[i], b[j])


def test_plane_results_off_a_full_grid_are_refused(tmp_path):
    full = torch.cartesian_prod(torch.arange(3.0), torch.arange(2.0))
    for coords in (full[:5], torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.cat([full[:5], full[:1]])):
        with pytest.raises(ValueError, match="full grid"):
            plane_grid(coords, f(coords))
    repeated = torch.cat([full[:5], full[:1]])  # (the repeated point's value NaN: its count still says)
    with pytest.raises(ValueError, match="some points repeat and others are missing"):
        plane_grid(repeated, torch.cat([f(full[:5]), torch.tensor([float("nan")])]))
    Results(full, {"loss": f(full)}).plot(tmp_path / "plane.png")
    assert (tmp_path / "plane.png").stat().st_size > 0


@pytest.mark.parametrize("alphas, losses, said", [
    ([0.0, 0.5, 1.0], [float("inf"), 1.0, 0.5], "Δ_min = 0"), ([0.0, 1.0], [1.0, float("inf")], "Δ_min = inf"),
    ([0.0, 0.5, 1.0], [1.0, float("nan"), 2.0], "Δ_min = nan"), ([0.0, 0.5, 1.0], [2.0, 1.0, 1.5], "Δ_min = 0.5"),
    ([-0.5, 0.0, 0.5, 1.0, 1.5], [0.5, 2.0, 1.0, 0.5, 3.0], "Δ_min = 0"),  # (judged on [0, 1], as mli.report)
])
def test_a_curve_title_gives_delta_min_as_mli_does(alphas, losses, said, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    titles = []
    saved = plt.Figure.savefig
    monkeypatch.setattr(plt.Figure, "savefig", lambda self, *a, **k: titles.extend(
        ax.get_title() for ax in self.axes) or saved(self, *a, **k))
    coords = torch.tensor(alphas, dtype=torch.float64)[:, None]
    Results(coords, {"loss": torch.tensor(losses, dtype=torch.float64)}).plot(tmp_path / "curve.png")
    assert titles == [f"loss ({said})"]


def test_a_result_without_values_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no values to draw"):
        Results(torch.zeros(2, 1, dtype=torch.float64), {}).plot(tmp_path / "none.png")
