"""`jaxrt bench`'s figures (jaxrt.runtime.benchmark): counts from the outputs, speculative
statistics of the workload's own requests, and the printed table."""
from __future__ import annotations

import json

import pytest

from jaxrt.runtime.benchmark import Workload, format_table, run_workload
from jaxrt.runtime.engine import Engine

CONFIG = dict(max_num_seqs=4, max_num_batched_tokens=48, max_model_len=48, log=None,
              warmup=False)


def test_figures_count_the_workload(fake_runner):
    engine = Engine(fake_runner, **CONFIG)
    row = run_workload(engine, Workload(6, 8, 5))
    assert row["requests"] == 6 and row["output_tokens"] == 30
    assert row["output_tok_s"] == pytest.approx(30 / row["wall_s"])
    assert row["spec_acceptance_rate"] == 0.0 and row["spec_verifies"] == 0
    table = format_table([dict(row, scenario="plain")])
    assert "accept" not in table.splitlines()[0]
    assert table.splitlines()[2].split()[:4] == ["plain", "6", "8", "5"]


def test_speculative_figures_are_the_workloads_own(fake_runner):
    """A first workload on the same engine must not leak into the second's figures: each
    row's acceptance rate and mean accepted length are its requests' (summed from their
    RequestOutput.speculative), and the table prints them."""
    engine = Engine(fake_runner, speculative={"method": "ngram", "num_tokens": 3}, **CONFIG)
    first = run_workload(engine, Workload(3, 12, 12, shared_prefix_len=4, seed=1))
    before = engine.stats()
    second = run_workload(engine, Workload(4, 10, 16, seed=2))
    after = engine.stats()
    accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
    proposed = after.spec_proposed_tokens - before.spec_proposed_tokens
    assert proposed > 0 and second["spec_verifies"] > 0
    assert second["spec_acceptance_rate"] == pytest.approx(accepted / proposed)
    assert second["spec_mean_accepted_length"] == pytest.approx(
        (accepted + second["spec_verifies"]) / second["spec_verifies"])
    assert first["spec_verifies"] + second["spec_verifies"] <= after.steps * 4
    head, _, *lines = format_table([dict(first, scenario="a"), dict(second, scenario="b")]
                                   ).splitlines()
    assert head.split()[-2:] == ["accept", "len"]
    for line, row in zip(lines, (first, second)):
        assert line.split()[-2:] == [f"{row['spec_acceptance_rate']:.2f}",
                                     f"{row['spec_mean_accepted_length']:.2f}"]
    json.dumps(second)  # the JSON `jaxrt bench --out` writes
