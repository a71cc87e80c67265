"""A download that cannot reach the internet ends in a clear error naming what to do, not a traceback."""

from __future__ import annotations

import urllib.error

import pytest
from torchvision import datasets

from igrad.cli import main


@pytest.mark.parametrize("name, cls", [("cifar100", "CIFAR100"), ("cifar10", "CIFAR10")])
@pytest.mark.parametrize("command", ["train", "reproduce"])
def test_no_internet_is_a_clear_error(tmp_path, monkeypatch, capsys, name, cls, command):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(datasets, cls, offline)
    args = ["--data", name, "--download", "--data-root", str(tmp_path / "root")] if command == "train" else []
    if command == "reproduce":
        if name == "cifar10":
            pytest.skip("reproduce is CIFAR-100's experiment")
        args = ["--preset", "demo", "--data", name, "--download", "--out", str(tmp_path / "rep")]
        monkeypatch.setenv("IGRAD_CACHE", str(tmp_path / "cache"))
    rc = main([command, *args, "--out", str(tmp_path / "o")] if command == "train" else [command, *args])
    err = capsys.readouterr().err
    assert rc == 2 and f"could not download {name}" in err and "IGRAD_DATA" in err and "Traceback" not in err
