"""Suite-wide settings that make kernel-dependent numerics visible.

``IGRAD_TEST_THREADS`` (e.g. ``1`` or ``2``) pins torch's intra-op thread count for the whole run, so the
suite can be run once per thread count (``make test`` runs it with 1 and with 2): float32 reductions split
differently across threads and must stay within the suite's tolerances. ``IGRAD_TEST_NO_ONEDNN=1`` turns
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
