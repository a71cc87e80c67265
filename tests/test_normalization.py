"""The normalisation object: hand-computed values, round trip, and clear errors."""

from __future__ import annotations

import pytest
import torch

from igrad.errors import IgradError
from igrad.normalization import NORMALIZATIONS, Normalization


def test_apply_and_invert_hand_values():
    n = Normalization((0.5, 0.25), (0.5, 0.25))
    u8 = torch.tensor([[[[255]], [[0]]]], dtype=torch.uint8)  # raw 1.0 and 0.0
    x = n.apply(u8)
    assert x.dtype == torch.float32 and x.flatten().tolist() == [1.0, -1.0]  # (1 − .5)/.5, (0 − .25)/.25
    u16 = torch.tensor([[[[65535]], [[0]]]], dtype=torch.uint16)
    assert n.apply(u16).flatten().tolist() == [1.0, -1.0]
    raw = torch.tensor([[[[0.75]], [[0.5]]]])
    assert n.apply(raw).flatten().tolist() == [0.5, 1.0]
    assert raw.flatten().tolist() == [0.75, 0.5]  # float input not modified in place
    assert n.invert(torch.tensor([[[[0.5]], [[1.0]]]])).flatten().tolist() == [0.75, 0.5]
    assert n.invert(torch.tensor([[[[3.0]], [[-3.0]]]]), clamp=True).flatten().tolist() == [1.0, 0.0]


def test_round_trip_and_config():
    n = NORMALIZATIONS["cifar100"]
    raw = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(n.invert(n.apply(raw)), raw, atol=1e-6, rtol=0)  # |x| ≤ ~2: float32 rounding
    assert Normalization.from_config(n.to_config()) == n
    assert n.to_config() == {"mean": [0.5071, 0.4865, 0.4409], "std": [0.2673, 0.2564, 0.2762]}


@pytest.mark.parametrize(
    "mean,std,match",
    [
        ((0.5,), (0.5, 0.5), "one mean and one std"),
        ((), (), "one mean"),
        ((0.5,), (0.0,), "positive"),
        ((float("nan"),), (1.0,), "finite"),
    ],
)
def test_bad_values_refused(mean, std, match):
    with pytest.raises(IgradError, match=match):
        Normalization(mean, std)


def test_wrong_channels_and_missing_config():
    with pytest.raises(IgradError, match="3 channels"):
        NORMALIZATIONS["cifar100"].apply(torch.zeros(1, 1, 4, 4))
    with pytest.raises(IgradError, match="run.pt has no normalisation"):
        Normalization.from_config({"model": "x"}, source="run.pt")
