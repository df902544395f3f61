"""Decode loops over a ladder of page-table widths (`StepExecutable.decode_widths`).

A dense decode step reads K+V for every page of its table, so the engine gives a decode
loop the narrowest compiled width that holds its rows' contexts. Checked on a small random
model with the dense attention forced on the CPU and a ladder small enough that one
generation crosses several widths: the tokens equal one-step decoding's (separate
executables: no cache is shared between the two runs)."""
from __future__ import annotations

import numpy as np
import pytest

from jaxrt.frontends.build import build_module
from jaxrt.lowering.executable import StepExecutable
from jaxrt.lowering.xla import attention
from jaxrt.runtime.engine import Engine
from jaxrt.runtime.request import SamplingParams
from tests.lowering.test_step_executable import CONFIGS, random_weights

PAGES, PS = 64, 4


def _exe(module, weights, **kw):
    return StepExecutable(module, weights, num_pages=PAGES, page_size=PS, dtype="f32", **kw)


@pytest.fixture(scope="module")
def llama():
    module = build_module(CONFIGS["llama"])
    return module, random_weights(module)


def test_ladder_of_widths(llama, monkeypatch):
    monkeypatch.setenv("JAXRT_DECODE_ATTENTION", "dense")
    monkeypatch.setattr(attention, "DENSE_MIN_WIDTH_TOKENS", 8)
    monkeypatch.setattr(attention, "DENSE_WIDTH_GROWTH", 2)
    exe = _exe(*llama)
    assert exe.decode_widths(1, 32) == (2, 4, 8, 16, 32)
    assert exe.decode_widths(1, 5) == (2, 4, 5)
    # beyond the dense bound no narrower width is compiled (the loop stops by itself)
    monkeypatch.setattr(attention, "DENSE_DECODE_BYTES", 0)
    assert exe.decode_widths(1, 32) == (32,)
    monkeypatch.setenv("JAXRT_DECODE_ATTENTION", "dynamic")
    monkeypatch.setattr(attention, "DENSE_DECODE_BYTES", 64 << 20)
    assert exe.decode_widths(4, 32) == (32,)


def test_loops_take_the_narrowest_width_and_tokens_are_unchanged(llama, monkeypatch):
    monkeypatch.setenv("JAXRT_DECODE_ATTENTION", "dense")
    monkeypatch.setattr(attention, "DENSE_MIN_WIDTH_TOKENS", 8)
    monkeypatch.setattr(attention, "DENSE_WIDTH_GROWTH", 2)
    module, weights = llama
    prompts = [[5, 9, 2], [7, 1, 3, 3, 8, 2, 6, 4, 1, 9, 11]]
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    ref = Engine(_exe(module, weights), decode_steps=1, max_model_len=128,
                 warmup=False).generate(prompts, params)
    exe = _exe(module, weights)
    widths = []
    real = exe.decode

    def spy(tokens, positions, page_table, *args, **kw):
        widths.append(page_table.shape[1])
        # every row's last step fits the table it was given
        assert (positions + args[0] <= page_table.shape[1] * PS).all()
        return real(tokens, positions, page_table, *args, **kw)
    exe.decode = spy
    eng = Engine(exe, decode_steps=4, max_model_len=128, warmup=False)
    out = eng.generate(prompts, params)
    assert [o.ids for o in out] == [o.ids for o in ref]
    assert eng._decode_loops > 0
    # contexts grow from 4 to 41 tokens: the loops went through 4, 8 and 16 pages
    assert {4, 8, 16} <= set(widths) and max(widths) < 32
    assert widths == sorted(widths)


def test_engine_defaults_to_the_planned_length(llama):
    module, weights = llama
    assert Engine(_exe(module, weights, max_model_len=40), warmup=False).max_model_len == 40
    # with no plan: the cache's capacity, as before
    assert Engine(_exe(module, weights), warmup=False).max_model_len == PAGES * PS
