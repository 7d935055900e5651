"""Fixtures shared by the test files; plain helper functions are in helpers.py.

pytest puts this folder on sys.path (rootdir-relative "prepend" import mode, tests/ is not a
package), so test files import the helpers as `from helpers import ...`.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def alignspec_cache(tmp_path_factory, monkeypatch):
    """One model cache for the whole session (built-in models are built once), offline.

    The engine test files use it for every test: `pytestmark = pytest.mark.usefixtures("alignspec_cache")`."""
    root = tmp_path_factory.getbasetemp() / "alignspec-cache"
    monkeypatch.setenv("ALIGNSPEC_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


@pytest.fixture
def restore_torch_threads():
    """Puts torch's intra-op thread count back after the test (engines on the built-in
    models set one thread)."""
    import torch  # here, not at the top: the language tests never import torch
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
