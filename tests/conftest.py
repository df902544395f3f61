"""Makes `tests.*` helpers (strategies) importable however pytest is started."""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# Tests load many throw-away model files: they must not fill (and evict the real models
# from) the user's weight cache. tests/test_weight_cache.py turns it on in a tmp dir.
os.environ.setdefault("JAXRT_WEIGHT_CACHE", "off")
# Likewise the tokenizer cache: tests/frontends/test_tokenizer_cache.py turns it on.
os.environ.setdefault("JAXRT_TOKENIZER_CACHE", "off")
