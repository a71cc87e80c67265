"""Suite-wide settings that make kernel-dependent numerics visible, and the suite's tiers.

``IGRAD_TEST_THREADS`` (e.g. ``1`` or ``2``) pins torch's intra-op thread count for the whole run: float32
reductions split differently across threads and must stay within the suite's tolerances. ``make test`` runs
every test once in two processes of one thread each, then the numerical tests (marker ``numerics``: the
modules of :data:`NUMERICS`) again with 2 threads. Tiers: ``slow`` marks the real-data, multi-process and
end-to-end tests; ``make test-fast`` runs the rest. ``IGRAD_TEST_NO_ONEDNN=1`` turns
off oneDNN (mkldnn) convolutions, another set of kernels a CPU of another kind may pick; used to check that
every tolerance follows from float32 arithmetic rather than from one machine's kernel choice.

Decoded image folders are cached (``IGRAD_CACHE``, default ``~/.cache/igrad``): the whole session uses a
temporary cache, set before any fixture runs (a module-scoped fixture that trains is set up before the
function-scoped ones of its module), so no test's folder lands in the user's cache. The real-data tests opt
back into the user's (``test_train._USER_CACHE``, read when the module is collected, before this runs).
"""

from __future__ import annotations

import os

import pytest
import torch

#: The modules whose tests compare float arithmetic against a reference with tolerances that must hold at
#: any thread count: marked ``numerics`` here, in one place, and run at 1 and at 2 threads by ``make test``.
NUMERICS = {
    "test_engine.py",
    "test_engine_allowlist.py",
    "test_loss.py",
    "test_loss_fraction.py",
    "test_metrics.py",
    "test_saliency_parity.py",
    "test_saliency_layouts.py",
    "test_score_probability.py",
    "test_evaluate_amp.py",
    "test_label_smoothing.py",
}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.path.name in NUMERICS:
            item.add_marker(pytest.mark.numerics)


def pytest_configure(config) -> None:
    threads = os.environ.get("IGRAD_TEST_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    if os.environ.get("IGRAD_TEST_NO_ONEDNN") == "1":
        torch.backends.mkldnn.enabled = False


def pytest_report_header(config) -> str:
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
        f"oneDNN {'on' if torch.backends.mkldnn.enabled else 'off'}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )


@pytest.fixture(scope="session", autouse=True)
def _temporary_decoded_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IGRAD_CACHE", str(tmp_path_factory.mktemp("igrad-cache-session")))
        yield
