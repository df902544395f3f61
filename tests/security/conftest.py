"""Helpers of the untrusted-input tests: the synthetic model files of tests/frontends."""
import os
import sys

_FRONTENDS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "frontends")
if _FRONTENDS not in sys.path:
    sys.path.insert(0, _FRONTENDS)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Hugging Face model directory (tests/frontends/frontends_synth.py)."""
    from frontends_synth import write_tiny_hf_dir
    return write_tiny_hf_dir(tmp_path_factory.mktemp("hf") / "tiny")
