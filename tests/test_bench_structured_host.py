"""bench/profile_structured_host.py: the split decode step's host time with no device
work, under SmolLM2's tokenizer; both fill orders and the unconstrained loops run."""
from __future__ import annotations

import pytest

from bench import profile_structured_host as psh


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2")
@pytest.mark.parametrize("extra", [[], ["--serial"], ["--plain"]])
def test_profile_structured_host_runs(extra, capsys):
    assert psh.main(["--batch", "4", "--tokens", "8", "--reps", "1", *extra]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "ms of host a token step" in line and "batch 4" in line
    assert ("plain" in line) == ("--plain" in extra)
    assert ("serial" in line) == ("--serial" in extra)


def test_lowest_allowed_takes_the_lowest_set_bit_past_the_control_ids():
    """The masked sampler's stand-in returns, per row, the lowest allowed id >= 224."""
    import numpy as np
    mask = np.zeros((3, 16), np.int32)
    mask[0, 7] = 1 << 3             # id 227
    mask[1, 0] = -1                 # ids 0-31 (below 224: ignored) ...
    mask[1, 9] = np.int32(-(1 << 31))  # ... and id 319 (the sign bit)
    mask[2, 15] = (1 << 4) | (1 << 9)   # ids 484 and 489
    tokens, lp = psh.lowest_allowed(None, mask, None)
    assert tokens.tolist() == [[227, 319, 484]] and lp.shape == (1, 3)


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2")
def test_main_leaves_the_structured_module_as_it_was():
    """main() swaps the masked sampler for its host stand-in only while it runs: tests in
    the same process sample with the real one afterwards."""
    from jaxrt.runtime import structured
    before = structured.sample_masked, structured.OVERLAP_FILL
    psh.main(["--batch", "2", "--tokens", "4", "--reps", "1", "--serial"])
    assert (structured.sample_masked, structured.OVERLAP_FILL) == before
