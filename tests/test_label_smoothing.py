"""Label smoothing of L_C (``--label-smoothing``, the ``cpu`` preset's 0.1).

The trainer's classification loss is checked against the hand formula
``L_C = (1 - ε) CE(y, c) + ε (1/K) Σ_k -log softmax(y)_k`` on the very logits and labels it saw, in both
of its branches (λ = 0, and λ > 0 where the regulariser's forward gives the logits).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import test_train
from igrad.cli import main
from igrad.train import TrainConfig, fit
from igrad.train import trainer as trainer_module
from test_train import tiny

_cache, folder = test_train._cache, test_train.folder  # the shared fixtures


def hand_smoothed_ce(logits: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), 1)
    nll = -logp.gather(1, y[:, None]).squeeze(1)
    uniform = -logp.mean(1)
    return ((1 - eps) * nll + eps * uniform).mean()


@pytest.mark.parametrize("lam", [0.0, 0.1])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_trainer_loss_is_the_smoothed_cross_entropy(folder, tmp_path, monkeypatch, lam, eps):
    seen = []
    real = F.cross_entropy

    def spy(logits, y, **kw):
        out = real(logits, y, **kw)
        seen.append((logits.detach().clone(), y.clone(), out.detach().clone()))
        return out

    monkeypatch.setattr(trainer_module.F, "cross_entropy", spy)
    r = fit(tiny(folder, tmp_path / "r", epochs=1, steps_per_epoch=2, lam=lam, label_smoothing=eps, cos_samples=0))
    assert len(seen) == 2  # one classification loss per step
    for logits, y, value in seen:
        want = hand_smoothed_ce(logits, y, eps)
        assert float(value) == pytest.approx(float(want), rel=1e-5)
    # the logged L_C is the smoothed one (mean over the epoch's two steps of equal size)
    assert r.history[0]["l_c"] == pytest.approx(float(sum(v for *_, v in seen) / 2), rel=1e-5)


def test_smoothing_changes_the_loss(folder, tmp_path):
    # the same seed and weights: ε > 0 adds ε (mean -log p - CE) > 0 for a network near chance
    a = fit(tiny(folder, tmp_path / "a", epochs=1, steps_per_epoch=1, lam=0.0, cos_samples=0))
    b = fit(tiny(folder, tmp_path / "b", epochs=1, steps_per_epoch=1, lam=0.0, label_smoothing=0.5, cos_samples=0))
    assert a.history[0]["l_c"] != pytest.approx(b.history[0]["l_c"], rel=1e-4)


def test_presets():
    cpu = TrainConfig.preset_config("cpu")
    assert (cpu.label_smoothing, cpu.width, cpu.epochs, cpu.schedule) == (0.1, 0.5, 24, "cosine")
    assert (cpu.amp, cpu.channels_last, cpu.reg_fraction) == (True, True, 0.25)
    assert TrainConfig.preset_config("paper").label_smoothing == 0.0  # the paper-scale recipe: plain cross-entropy


@pytest.mark.parametrize("bad", ["-0.1", "1", "1.5", "nan"])
def test_bad_label_smoothing_is_refused(folder, tmp_path, capsys, bad):
    rc = main(["train", "--data", str(folder), "--label-smoothing", bad, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "label_smoothing must be in [0, 1)" in err and "Traceback" not in err
