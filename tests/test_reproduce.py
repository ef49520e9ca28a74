"""The reproduce grid: resumable runs and the paper's table computed from them."""
import dataclasses
import json
import re

import pytest

from mlifast.datasets import DatasetNotFoundError, mnist
from mlifast.experiments import reproduce
from mlifast.experiments.reproduce import GridConfig, run_grid, table, write_report

try:
    mnist()
    MNIST_MISSING = ""
except DatasetNotFoundError as error:  # pragma: no cover - make test installs it
    MNIST_MISSING = f"MNIST missing: {error}"
needs_mnist = pytest.mark.skipif(bool(MNIST_MISSING), reason=MNIST_MISSING)

CONFIG = GridConfig(datasets=("mnist",), lrs=(0.1, 0.01), hidden=(16,), epochs=2, batch_size=100, alphas=6,
                    n_train=1000, n_eval=500, eval_batch_size=250, loss_filter=10.0, threshold=1e-3)


@needs_mnist
def test_grid_runs_resume_and_tabulate(tmp_path, monkeypatch):
    records = run_grid(CONFIG, tmp_path, progress=False)
    assert len(records) == 8 and len(list((tmp_path / "runs").glob("*.json"))) == 8
    for r in records:
        assert len(r["losses"]) == 6 and r["final_loss"] == r["losses"][-1]
        rises = [max(0.0, later - min(r["losses"][: i + 1])) for i, later in enumerate(r["losses"])]
        assert r["delta_min"] == pytest.approx(max(rises), abs=1e-12)

    (tmp_path / "runs" / "mnist-adam-bn-lr0.1.json").unlink()  # as if killed before the last run
    calls = []
    original = reproduce.run_one
    monkeypatch.setattr(reproduce, "run_one", lambda *a, **k: calls.append(a[2:]) or original(*a, **k))
    again = run_grid(CONFIG, tmp_path, progress=False)
    assert calls == [("mnist", "adam", True, 0.1)]
    assert [r["id"] for r in again] == [r["id"] for r in records]

    text = table(again, CONFIG)
    row = next(line for line in text.splitlines() if line.startswith("| SGD-NoBN"))
    for lr, cell in zip((0.1, 0.01), row.split("|")[2:4]):
        r = next(r for r in again if r["optimizer"] == "sgd" and not r["batch_norm"] and r["lr"] == lr)
        assert cell.strip() == f"{float(r['delta_min'] > 1e-3):.2f} (1)"


def test_runs_made_with_other_settings_are_refused_not_resumed(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    combos = [(d, o, bn, lr) for d in CONFIG.datasets for o in CONFIG.optimizers for bn in CONFIG.batch_norm
              for lr in CONFIG.lrs]
    for combo in combos:  # a finished grid (no data is read to resume it)
        record = {"id": reproduce.run_id(*combo), "lr": combo[3], "settings": reproduce.run_settings(CONFIG)}
        (runs / f"{record['id']}.json").write_text(json.dumps(record))
    # What only picks runs or reads the table may change:
    relaxed = dataclasses.replace(CONFIG, loss_filter=0.5, lrs=(0.01,))
    assert [r["id"] for r in run_grid(relaxed, tmp_path, progress=False)] == [
        reproduce.run_id(*c) for c in combos if c[3] == 0.01]
    config_file = (tmp_path / "config.json").read_text()
    for changed, said in ((dict(alphas=7), "alphas=6 there, 7 now"), (dict(hidden=(32,)), "hidden=[16] there, [32] now")):
        with pytest.raises(ValueError, match=re.escape(said)):
            run_grid(dataclasses.replace(CONFIG, **changed), tmp_path, progress=False)
        assert (tmp_path / "config.json").read_text() == config_file


def test_runs_of_earlier_versions_resume_by_their_folder_settings(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    combos = [(d, o, bn, lr) for d in CONFIG.datasets for o in CONFIG.optimizers for bn in CONFIG.batch_norm
              for lr in CONFIG.lrs]
    for combo in combos:  # (records without "settings")
        (runs / f"{reproduce.run_id(*combo)}.json").write_text(json.dumps({"id": reproduce.run_id(*combo)}))
    with pytest.raises(ValueError, match="made with other settings"):  # (nothing says how they were made)
        run_grid(CONFIG, tmp_path, progress=False)
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(CONFIG)))
    assert len(run_grid(CONFIG, tmp_path, progress=False)) == len(combos)
    with pytest.raises(ValueError, match="alphas=6 there, 7 now"):
        run_grid(dataclasses.replace(CONFIG, alphas=7), tmp_path, progress=False)


def test_report_files(tmp_path):
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "none").glob("*.json"))]
    write_report(records, CONFIG, tmp_path)
    assert "SGD-BN" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "scatter.png").stat().st_size > 0


def test_a_path_with_a_non_finite_loss_counts_as_non_monotonic_in_the_table_and_report(tmp_path):
    """Δ_min is inf (stored None) where the loss is inf inside the path and finite at θT:
    non-monotonic, out of the mean Δ_min, off the scatter."""
    def run(delta, lr):
        return {"optimizer": "sgd", "batch_norm": False, "lr": lr, "final_loss": 0.05, "delta_min": delta,
                "normalized_distance": 0.5, "diverged": False, "seconds": 1.0}

    config = dataclasses.replace(CONFIG, optimizers=("sgd",), batch_norm=(False,))
    records = [run(None, 0.1), run(0.0, 0.1), run(0.2, 0.01), run(None, 0.01)]
    text = table(records, config)
    assert "| SGD-NoBN | 0.50 (2) | 1.00 (2) | 0.2 |" in text, text
    write_report(records, config, tmp_path)
    assert (tmp_path / "scatter.png").stat().st_size > 0
