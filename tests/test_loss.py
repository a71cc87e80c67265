"""The interpretable-gradient loss: exact parameter gradients, the single forward, and that it works."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import igrad
from igrad import IgradError
from references import batch_statistics, frozen_copy, plain_input_gradient


class Tiny(nn.Module):
    def __init__(self, k=3, momentum=0.1):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum)
        self.fc = nn.Linear(4, k)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu6(self.b2(self.c2(x)) * 3)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("error", ["cosine", "mse", "mae"])
@pytest.mark.parametrize("stats", ["running", "batch-frozen", "eval-model"])
def test_parameter_gradient_matches_central_finite_differences(error, stats):
    torch.manual_seed(0)
    model = Tiny(momentum=0.0).double()  # momentum 0: the running statistics never move
    with torch.no_grad():
        for bn in (model.b1, model.b2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    if stats == "eval-model":
        model.eval()
    crit = igrad.GradientAlignmentLoss(error, stats="running" if stats == "eval-model" else stats)
    l_r, _ = crit(model, x, y)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(l_r, params, allow_unused=True)  # the head's bias does not move δx
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]

    # reference: L_R(θ) = mean_i E(δx_i(θ), δᴳx_i(θ0)), δx by plain autograd on an eval-mode model whose
    # statistics are the ones the mode prescribes (running, or this batch's), δᴳx held fixed at θ0
    guided = igrad.gradient(
        model, x, y, guided=True, stats="running" if stats != "batch-frozen" else stats, train=True
    )  # train=True: the model's own (training) modes, as the loss sees it
    err = igrad.ERRORS[error]

    # docs/method.md §The loss: ∇θ L_R is exact "up to the held-constant statistics": batch statistics measured at θ0
    frozen = batch_statistics(model, x) if stats == "batch-frozen" else {}

    def value():
        ref = frozen_copy(model, frozen)
        return err(plain_input_gradient(ref, x, y, create_graph=True).flatten(1), guided.flatten(1)).mean()

    torch.testing.assert_close(value().detach(), l_r.detach())
    h = 1e-6
    for p, g in zip(params, grads, strict=True):
        fd = torch.zeros_like(p)
        for i in range(p.numel()):
            flat = p.data.view(-1)
            old = flat[i].item()
            flat[i] = old + h
            up = value().item()
            flat[i] = old - h
            down = value().item()
            flat[i] = old
            fd.view(-1)[i] = (up - down) / (2 * h)
        torch.testing.assert_close(g, fd, atol=1e-6, rtol=1e-4)


def test_batch_frozen_single_forward_is_an_exact_training_forward():
    """The one forward of batch-frozen mode gives train-mode logits, the same running-statistics update
    and the same cross-entropy gradient as an ordinary training forward."""
    torch.manual_seed(1)
    ours = Tiny().double().train()
    ref = copy.deepcopy(ours)
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    l_r, logits = igrad.GradientAlignmentLoss(stats="batch-frozen")(ours, x, y)
    ref_logits = ref(x)
    torch.testing.assert_close(logits, ref_logits)
    for (n, a), b in zip(ours.named_buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=n)
    F.cross_entropy(logits, y).backward()
    F.cross_entropy(ref_logits, y).backward()
    for (n, a), b in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=n)
    assert 0 <= l_r.item() <= 2


def test_running_mode_uses_two_forwards_only_for_training_batchnorm():
    calls = []
    model = Tiny().train()
    model.c1.register_forward_hook(lambda *a: calls.append(1))
    crit = igrad.GradientAlignmentLoss(stats="running")
    crit(model, torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 0]))
    assert len(calls) == 2
    calls.clear()
    crit(model.eval(), torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 0]))
    assert len(calls) == 1
    calls.clear()
    igrad.GradientAlignmentLoss(stats="batch-frozen")(
        model.train(), torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 0])
    )
    assert len(calls) == 1


def test_register_custom_error_function():
    name = "test_l1_of_signs"

    @igrad.register_error(name)
    def sign_error(a, b):
        return (torch.tanh(a * 1e3) - torch.sign(b)).abs().mean(1)

    try:
        model = Tiny().eval()
        x = torch.randn(2, 3, 6, 6)
        l_r, logits = igrad.GradientAlignmentLoss(name)(model, x, torch.tensor([0, 1]))
        assert l_r.requires_grad and logits.shape == (2, 3)
        l_r.backward()
        assert model.c1.weight.grad is not None and model.c1.weight.grad.abs().sum() > 0
        with pytest.raises(igrad.IgradError, match="already registered"):
            igrad.register_error(name)(sign_error)
    finally:
        igrad.ERRORS.pop(name)


def quadrant_task(n, generator):
    """Noise images with one bright blob; the class is the quadrant that holds it."""
    x = torch.randn(n, 3, 12, 12, generator=generator) * 0.5
    y = torch.randint(0, 4, (n,), generator=generator)
    for i in range(n):
        r0 = 6 * (int(y[i]) // 2) + int(torch.randint(0, 3, (1,), generator=generator))
        c0 = 6 * (int(y[i]) % 2) + int(torch.randint(0, 3, (1,), generator=generator))
        x[i, :, r0 : r0 + 3, c0 : c0 + 3] += 2.0
    return x, y


def quad_net(depth=7, ch=16):
    """A plain deep ReLU network: its standard input gradient is far from the guided one."""
    layers = [nn.Conv2d(3, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
    for i in range(depth - 1):
        layers += [
            nn.Conv2d(ch, ch, 3, padding=1, stride=2 if i == 1 else 1),
            nn.BatchNorm2d(ch),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, 4))


def train_quadrants(lam, stats="running", steps=150):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = quad_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    crit = igrad.GradientAlignmentLoss(stats=stats)
    x_test, y_test = quadrant_task(128, torch.Generator().manual_seed(123))
    for _ in range(steps):
        x, y = quadrant_task(32, g)
        opt.zero_grad()
        if lam:
            l_r, logits = crit(model, x, y)
            loss = F.cross_entropy(logits, y) + lam * l_r
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    return igrad.gradient_cosine(model, x_test, y_test).mean().item(), acc


def test_regularised_training_raises_gradient_alignment_on_held_out_inputs():
    cos_base, acc_base = train_quadrants(lam=0.0)
    assert acc_base > 0.9 and cos_base < 0.6, (cos_base, acc_base)
    for stats in ("running", "batch-frozen"):
        cos_reg, acc_reg = train_quadrants(lam=1.0, stats=stats)
        assert acc_reg > 0.9, (stats, acc_reg)
        assert cos_reg > cos_base + 0.3, (stats, cos_base, cos_reg)


@pytest.mark.parametrize(
    "name, stats, fraction, channels_last",
    [
        ("cifar_resnet18", "running", 1.0, False),
        ("cifar_resnet18", "batch-frozen", 1.0, False),
        ("cifar_resnet18", "batch-frozen", 1.0, True),
        ("cifar_resnet18", "batch-frozen", 0.5, True),
    ],
)
def test_loss_under_bf16_autocast_tracks_float32(name, stats, fraction, channels_last):
    """Mixed precision (the trainer's --amp, on the CPU too) runs the same rules, in channels-last too and
    with the sub-batch regulariser (the same subset in both precisions); bf16 results stay close to float32."""
    torch.manual_seed(3)
    model = igrad.create_model(name, width=0.125, num_classes=10).train()
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    if channels_last:
        twin = twin.to(memory_format=torch.channels_last)
    crit = igrad.GradientAlignmentLoss(stats=stats, fraction=fraction)
    l32, _ = crit(model, x, y, generator=torch.Generator().manual_seed(1))
    l32.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x16 = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        l16, logits = crit(twin, x16, y, generator=torch.Generator().manual_seed(1))
    assert logits.dtype == torch.bfloat16 and l16.dtype == torch.float32
    l16.float().backward()
    assert abs(l16.item() - l32.item()) < 0.05
    g32 = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    g16 = torch.cat([p.grad.flatten() for p in twin.parameters() if p.grad is not None])
    assert g16.dtype == torch.float32 and torch.isfinite(g16).all()
    assert F.cosine_similarity(g16, g32, dim=0) > 0.9


def test_sync_batchnorm_outside_distributed_is_plain_batchnorm():
    """nn.SyncBatchNorm without a process group uses F.batch_norm, which the rules intercept: the loss
    and its parameter gradients equal those of the same network with nn.BatchNorm2d."""
    torch.manual_seed(4)
    plain = Tiny().double().train()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    assert isinstance(synced.b1, nn.SyncBatchNorm)
    x = torch.randn(6, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    crit = igrad.GradientAlignmentLoss(stats="batch-frozen")
    for model in (plain, synced):
        l_r, logits = crit(model, x, y)
        (F.cross_entropy(logits, y) + l_r).backward()
    for (n, a), b in zip(plain.named_parameters(), synced.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=n)


class _SynchronisedStatistics(nn.Module):
    """What nn.SyncBatchNorm does under torch.distributed (world > 1): its statistics come from
    torch.batch_norm_stats and its own autograd function, not from F.batch_norm."""

    def forward(self, x):
        mean, invstd = torch.batch_norm_stats(x, 1e-5)
        return F.relu((x - mean[None, :, None, None]) * invstd[None, :, None, None]).mean((2, 3))


def test_synchronised_batchnorm_is_refused_with_a_clear_error():
    model = _SynchronisedStatistics().train()
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(IgradError, match="SyncBatchNorm with synchronised statistics"):
        igrad.GradientAlignmentLoss()(model, x, torch.tensor([0, 1, 2, 0]))
