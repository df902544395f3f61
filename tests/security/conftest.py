"""Helpers of the untrusted-input tests: the synthetic model files of tests/frontends."""
import os
import sys

_FRONTENDS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "frontends")
if _FRONTENDS not in sys.path:
    sys.path.insert(0, _FRONTENDS)
