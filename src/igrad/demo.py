"""The short demonstration of the paradigm: the same small network trained briefly without and with
the interpretable-gradient loss, compared on test accuracy and eval-mode mean cos(δx, δᴳx)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json
from .loss import DEFAULT_LAMBDA
from .provenance import provenance
from .train import TrainConfig, fit_or_resume

__all__ = ["DemoResult", "run_demo"]


@dataclass
class DemoResult:
    """Test accuracy and mean cos(δx, δᴳx) of the baseline and the regularised model."""

    baseline: dict[str, Any]
    regularised: dict[str, Any]

    def table(self) -> str:
        """A small plain-text table of the two runs."""
        lines = [f"{'model':<22}{'lambda':>10}{'test acc':>10}{'mean cos(dx, dGx)':>20}"]
        for name, row in (("baseline", self.baseline), ("regularised", self.regularised)):
            lines.append(f"{name:<22}{row['lam']:>10g}{row['test_acc']:>10.2%}{row['cos']:>20.3f}")
        return "\n".join(lines)


def run_demo(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str] = "runs/demo",
    *,
    lam: float = DEFAULT_LAMBDA,
    model: str = "cifar_resnet18",
    width: float = 0.25,
    epochs: int = 2,
    steps_per_epoch: int = 60,
    download: bool = False,
    seed: int = 0,
    quiet: bool = False,
) -> DemoResult:
    """Train ``model`` twice from the same seed (``λ = 0`` and ``λ = lam``) with the reduced-budget
    recipe cut to ``epochs × steps_per_epoch`` steps, and write ``out/demo.json``. A finished run is
    reused, an interrupted one resumed, one trained with other settings refused."""
    out = Path(out)
    rows = {}
    for name, value in (("baseline", 0.0), ("regularised", lam)):
        config = TrainConfig.preset_config(
            "cpu",
            model=model,
            width=width,
            data=str(data),
            download=download,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            lam=value,
            seed=seed,
            out=str(out / name),
        )
        result = fit_or_resume(config, quiet=quiet)
        rows[name] = {"lam": value, "test_acc": result.test_acc, "cos": result.cos, "run_dir": str(result.run_dir)}
    demo = DemoResult(rows["baseline"], rows["regularised"])
    atomic_write_json(out / "demo.json", {"results": rows, **provenance(config.to_dict(), seed)})
    return demo
