"""What the input gradient is taken of (``score``): the logit ``y_c`` (docs/method.md §The loss) or the softmax
probability
``p_c``, in :func:`igrad.input_gradients`, :class:`igrad.GradientAlignmentLoss` and the
trainer (``--reg-score``).

References: plain autograd of ``softmax(model(x))_c`` in float64, guided backpropagation by module swap
(pytorch-grad-cam's way) of the same softmax output, and the regulariser's parameter gradient by double
backpropagation through them (tests/references.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import igrad
from igrad import IgradError
from igrad.cli import main
from igrad.gradients import input_gradients
from igrad.train import TrainConfig
from references import Softmaxed, guided_by_module_swap, plain_input_gradient
from test_loss_fraction import _model as _train_mode_model


def _model() -> nn.Module:
    return _train_mode_model().eval()  # its running statistics randomised


def test_probability_gradients_match_plain_and_module_swap_references():
    model = _model()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    res = input_gradients(model, x, y, score="prob")
    want = plain_input_gradient(Softmaxed(model), x, y)
    want_guided, swapped = guided_by_module_swap(Softmaxed(model), x, y)
    assert swapped == 2
    torch.testing.assert_close(res.standard, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res.guided, want_guided, rtol=1e-9, atol=1e-12)
    # the logits are still the logits, and the logit's gradient is a different vector (the test can tell)
    torch.testing.assert_close(res.logits, model(x))
    logit = input_gradients(model, x, y)
    cos = F.cosine_similarity(logit.standard.flatten(1), res.standard.flatten(1))
    assert float(cos.max()) < 0.99


def test_probability_regulariser_value_and_parameter_gradient():
    """L_R = mean_i (1 - cos(∂p_c/∂x_i, guided ∂p_c/∂x_i)) and its ∇θ by double backpropagation."""
    model = _model()
    ours, ref = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([4, 3, 2, 1, 0, 1])
    l_r, logits = igrad.GradientAlignmentLoss(stats="running", score="prob")(ours, x, y)
    l_r.backward()
    g = plain_input_gradient(Softmaxed(ref), x, y, create_graph=True)
    gg, _ = guided_by_module_swap(Softmaxed(ref), x, y)
    want = (1 - F.cosine_similarity(g.flatten(1), gg.flatten(1), dim=1, eps=0)).mean()
    want.backward()
    assert float(l_r.detach()) == pytest.approx(float(want.detach()), rel=1e-9)
    torch.testing.assert_close(logits, ref(x))
    for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-10, msg=name)


def test_subset_regulariser_takes_the_score_too():
    model = _model().train()
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (8,))
    logit = igrad.GradientAlignmentLoss(fraction=0.5)(model, x, y, generator=torch.Generator().manual_seed(1))[0]
    prob = igrad.GradientAlignmentLoss(fraction=0.5, score="prob")(
        model, x, y, generator=torch.Generator().manual_seed(1)
    )[0]
    assert abs(logit.detach().item() - prob.detach().item()) > 1e-4


def test_unknown_score_is_refused():
    model = _model()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(IgradError, match="score 'probability'.*logit, prob"):
        input_gradients(model, x, score="probability")
    with pytest.raises(IgradError, match="score 'softmax'"):
        igrad.GradientAlignmentLoss(score="softmax")
    with pytest.raises(IgradError, match="score 'p'"):
        TrainConfig(reg_score="p").validate()


def test_train_cli_refuses_an_unknown_score(tmp_path, capsys):
    rc = main(["train", "--reg-score", "softmax", "--lam", "0.1", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "score 'softmax'" in err and "logit, prob" in err and "Traceback" not in err
