"""How far batching moves a real model's logprobs: the evidence for NEAR_TIE in
tests/runtime/test_engine_properties.py.

    python bench/bench_near_tie.py smollm2 25      # or tiny-llama; trials

Random mixes of 2-6 requests (shared-prefix prompts of up to 30 tokens, 4-16 greedy
tokens) run batched (prefix caching, chunked prefill) and one at a time; prints the
largest |logprob| difference of the chosen token where the two agree so far, and any
divergence with its top-2 gap. CPU, float32, the test runners of tests/runtime/conftest.py.
"""
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.runtime.conftest import FACTORIES
from jaxrt.runtime.engine import Engine
from jaxrt.runtime.request import SamplingParams
BASE = dict(max_num_seqs=4, max_num_batched_tokens=48, max_model_len=48, warmup=False, log=None)
name = sys.argv[1]
f = FACTORIES[name]()
rng = random.Random(0)
alpha = list(f.prompt_tokens)[:6]
worst = 0.0; n = 0; diffs = 0; min_gap_at_diff = []
for trial in range(int(sys.argv[2])):
    jobs = []
    for _ in range(rng.randint(2, 6)):
        jobs.append(([rng.choice(alpha) for _ in range(rng.randint(1, 30))], rng.randint(4, 16)))
    ps = [SamplingParams(max_tokens=m, ignore_eos=True, logprobs=2) for _, m in jobs]
    e1 = Engine(f.make(), **BASE)
    got = e1.generate([p for p, _ in jobs], ps)
    e2 = Engine(f.make(), **{**BASE, "enable_prefix_caching": False, "enable_chunked_prefill": False})
    want = [e2.generate([p], q)[0] for (p, _), q in zip(jobs, ps)]
    for g, w in zip(got, want):
        for k, (a, b) in enumerate(zip(g.ids, w.ids)):
            la, lb = g.logprobs[k], w.logprobs[k]
            if a != b:
                diffs += 1
                top = sorted(la.values(), reverse=True); min_gap_at_diff.append(top[0]-top[1])
                break
            worst = max(worst, abs(la[a] - lb[b])); n += 1
print(name, "tokens compared", n, "max |dlogprob| of the chosen token", worst, "divergences", diffs, min_gap_at_diff)
