"""``igrad demo`` (:func:`igrad.demo.run_demo`): the baseline, then the same weights fine-tuned with L_R."""

from __future__ import annotations

import json

import pytest

from igrad.cli import main
from igrad.demo import DEMO_FINETUNE, DEMO_LAMBDA, DEMO_TRAIN, demo_configs, run_demo
from igrad.provenance import file_sha256
from references import write_folder


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("IGRAD_CACHE", str(tmp_path_factory.getbasetemp() / "igrad-cache"))


def test_configs_are_the_recipe_then_a_fine_tuning_of_the_baseline(tmp_path):
    base, reg = demo_configs("data", tmp_path)
    assert (base.preset, base.lam, base.init, base.width, base.epochs) == ("cpu", 0.0, None, 0.25, DEMO_TRAIN["epochs"])
    assert reg.init == str(tmp_path / "baseline" / "last.pt") and reg.lam == DEMO_LAMBDA
    assert (reg.lr, reg.epochs, reg.steps_per_epoch) == (DEMO_FINETUNE["lr"], 1, DEMO_FINETUNE["steps_per_epoch"])
    # everything else is the baseline's (same data, width, augmentation, precision, seed)
    same = {k for k, v in base.to_dict().items() if reg.to_dict()[k] == v}
    assert set(base.to_dict()) - same == {"lam", "init", "out", "lr", "epochs", "steps_per_epoch", "warmup_epochs"}


@pytest.mark.slow
def test_run_demo_and_cli(tmp_path, capsys):
    data = write_folder(tmp_path / "data")
    tiny = dict(width=0.125, epochs=1, batch_size=8, cos_samples=8, threads=1)
    result = run_demo(data, tmp_path / "d", quiet=True, **tiny)
    saved = json.loads((tmp_path / "d" / "demo.json").read_text())
    assert saved["results"]["regularised"]["lam"] == DEMO_LAMBDA and saved["versions"]["torch"]
    # the regularised run started from the baseline's final weights (the checkpoint's SHA-256 it recorded)
    run = json.loads((tmp_path / "d" / "regularised" / "run.json").read_text())
    assert run["provenance"]["config"]["init_sha256"] == file_sha256(tmp_path / "d" / "baseline" / "last.pt")
    assert 0 <= result.baseline["test_acc"] <= 1 and -1 <= result.regularised["cos"] <= 1
    assert "regularised (fine-tuned baseline)" in result.table()
    rc = main(["demo", "--data", str(data), "--out", str(tmp_path / "d"), "--width", "0.125", "--epochs", "1"])
    assert rc == 2  # another batch size than the finished runs': refused, not silently reused
    assert "cannot resume" in capsys.readouterr().err
