"""bf16 autocast on the CPU as on the GPU, with a warning where bf16 is emulated; channels-last."""

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


def _cpu_flags() -> set[str] | None:
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), None)
    return set(line.split(":", 1)[1].split()) if line else None


def test_bf16_pays_on_the_cpu_exactly_where_it_has_bf16_units():
    """The CPU's own feature flags (the kernel's /proc/cpuinfo, not torch's probe) decide it."""
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags on this system")
    expected = bool({"avx512_bf16", "amx_bf16"} & flags)
    assert precision.bf16_pays("cpu") is expected
    if not torch.cuda.is_available():
        assert precision.bf16_pays("auto") is expected
    with pytest.raises(IgradError, match="bad device 'gpu0'"):
        precision.bf16_pays("gpu0")


@pytest.mark.parametrize("native", [True, False])
def test_the_demo_uses_bf16_only_where_native_unless_told(monkeypatch, native):
    """``igrad demo`` and ``reproduce --preset demo`` (training and evaluation) follow the device; the caller's
    amp wins; the cpu preset keeps its bf16 (its committed results were made in bf16)."""
    from igrad.demo import demo_configs
    from igrad.reproduce import preset_settings

    monkeypatch.setattr(precision, "native_bf16", lambda kind: native)
    base, reg = demo_configs("data", "out")
    assert base.amp is native and reg.amp is native
    assert demo_configs("data", "out", amp=True)[0].amp is True
    s = preset_settings("demo")
    assert s["train"]["amp"] is native and s["evaluate"]["amp"] is native
    s = preset_settings("demo", train={"amp": True})
    assert s["train"]["amp"] is True and s["evaluate"]["amp"] is True
    s = preset_settings("demo", train={"amp": True}, evaluation={"amp": False})
    assert s["train"]["amp"] is True and s["evaluate"]["amp"] is False
    s = preset_settings("cpu")
    assert s["evaluate"]["amp"] is True and "amp" not in s["train"]  # the recipe's (bf16)
