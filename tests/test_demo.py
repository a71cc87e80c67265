"""`igrad demo` end to end on tiny generated data, and the CLI's front door."""

from __future__ import annotations

import json
import math

import pytest

from igrad.cli import build_parser, main
from references import write_folder


def test_demo_runs_both_models_and_reports_finite_numbers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IGRAD_CACHE", str(tmp_path / "cache"))
    data = write_folder(tmp_path / "data", n_train=8, n_test=4, size=12)
    out = tmp_path / "demo"
    argv = ["demo", "--data", str(data), "--out", str(out), "--width", "0.125", "--epochs", "1"]
    argv += ["--steps-per-epoch", "2", "--lam", "0.5", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "baseline" in printed and "regularised" in printed
    report = json.loads((out / "demo.json").read_text())
    assert set(report["results"]) == {"baseline", "regularised"}
    assert report["results"]["baseline"]["lam"] == 0 and report["results"]["regularised"]["lam"] == 0.5
    for row in report["results"].values():
        assert 0 <= row["test_acc"] <= 1 and math.isfinite(row["cos"]) and -1 <= row["cos"] <= 1
    assert report["versions"]["torch"] and "config" in report
    # a second call reuses the finished runs (nothing retrained: the folders hold their checkpoints)
    stamp = (out / "baseline" / "last.pt").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "baseline" / "last.pt").stat().st_mtime_ns == stamp
    # ... and a run folder trained with other settings is refused, never reported under the new ones
    changed = [*argv[:-2], "0.25", "--quiet"]
    assert main(changed) == 2
    assert "cannot resume" in capsys.readouterr().err


def test_cli_help_lists_commands_and_errors_are_one_line(tmp_path, capsys):
    help_text = build_parser().format_help()
    for command in ("demo", "train", "explain", "evaluate"):
        assert command in help_text
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert main(["demo", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
