"""The short demonstration of the paradigm: the same small network trained briefly without and with
the interpretable-gradient loss, compared on test accuracy and eval-mode mean cos(δx, δᴳx).

``igrad demo`` (:func:`run_demo`) is the training half of ``igrad reproduce --preset demo``
(:mod:`igrad.reproduce`) for one network: no saliency evaluation, no report, just the two numbers that
show the effect. Both use :data:`DEMO_LAMBDA`: a run of a few dozen steps is too short for the default
λ (:data:`igrad.DEFAULT_LAMBDA`, chosen for full trainings) to move cos(δx, δᴳx), and the demonstration
is there to show that it moves. They differ in budget only where their jobs differ: the reproduction
preset trains two networks and evaluates four models, so it trains each for less (README, Reproduction).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json
from .provenance import provenance
from .train import TrainConfig, fit_or_resume

__all__ = ["DEMO_LAMBDA", "DemoResult", "run_demo"]

#: λ of the regularised model in both demonstrations (``igrad demo``, ``igrad reproduce --preset demo``):
#: strong, so that a few minutes of training show the effect on cos(δx, δᴳx) (README, "Decisions":
#: λ = 0.75 aligns the gradients, at an accuracy cost).
DEMO_LAMBDA = 0.75


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
    lam: float = DEMO_LAMBDA,
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
