"""bf16 autocast on the CPU as on the GPU, with a warning where bf16 is emulated; channels-last (issue 12)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import igrad.precision as precision
from igrad import IgradError


def test_cpu_autocast_runs_convolutions_in_bf16():
    conv = nn.Conv2d(3, 4, 3)
    with precision.autocast("cpu"):
        assert conv(torch.randn(1, 3, 5, 5)).dtype == torch.bfloat16
    with precision.autocast(torch.device("cpu"), enabled=False):
        assert conv(torch.randn(1, 3, 5, 5)).dtype == torch.float32


def test_emulated_bf16_warns_instead_of_refusing(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda kind: False)
    with pytest.warns(RuntimeWarning, match="emulated"):
        ctx = precision.autocast("cpu")
    with ctx:
        assert nn.Linear(2, 2)(torch.randn(1, 2)).dtype == torch.bfloat16


def test_unknown_device_type_is_refused():
    with pytest.raises(IgradError, match="not available on device type 'meta'"):
        precision.autocast("meta")


def test_channels_last_model_and_batch():
    model = precision.to_channels_last(nn.Conv2d(3, 4, 3))
    assert model.weight.is_contiguous(memory_format=torch.channels_last)
    x = precision.to_channels_last(torch.randn(2, 3, 5, 5))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    v = torch.randn(2, 3)
    assert precision.to_channels_last(v) is v
