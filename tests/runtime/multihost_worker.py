"""One process of tests/runtime/test_multihost.py: `python multihost_worker.py ID N PORT`.
Process 0 runs an Engine on `LeaderRunner` (tp = N, one CPU device per process) and an
unsharded reference on its own device; the others `follow`. Prints one JSON line."""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np


def main() -> None:
    pid, n, port = (int(x) for x in sys.argv[1:4])
    from jaxrt.runtime.multihost import LeaderRunner, follow, initialize
    initialize(f"localhost:{port}", n, pid)
    from jaxrt.compiler import Target, compile_loaded
    from jaxrt.frontends.config import ModelConfig
    from jaxrt.frontends.loaded import expected_weight_shapes
    from jaxrt.runtime.engine import Engine
    from jaxrt.runtime.request import SamplingParams
    cfg = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, max_position=64)
    rng = np.random.default_rng(3)
    weights = {k: (rng.standard_normal(s) * (0.3 if len(s) > 1 else 0.1) + (len(s) == 1))
               .astype(np.float32) for k, s in expected_weight_shapes(cfg).items()}

    def executable(tp: int):
        loaded = SimpleNamespace(config=cfg, weights=weights, tokenizer=None,
                                 chat_template=None, source="random")
        return compile_loaded(loaded, target=Target("cpu", 1 << 30, "f32"), page_size=4,
                              num_pages=32, outline_layers=False,
                              tensor_parallel=tp).executable()

    exe = executable(n)
    if pid != 0:
        print(json.dumps({"process": pid, "runs": follow(exe)}), flush=True)
        return
    prompts = [[5, 9, 2, 7], [3, 1, 4, 1, 5]]
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    runner = LeaderRunner(exe)
    engine = Engine(runner, eos_token_ids=(), max_num_seqs=2, warmup=False, decode_steps=2,
                    log=None)
    sharded = [o.ids for o in engine.generate(prompts, greedy)]
    engine.close()
    runner.stop()
    single = Engine(executable(1), eos_token_ids=(), max_num_seqs=2, warmup=False,
                    decode_steps=2, log=None)
    reference = [o.ids for o in single.generate(prompts, greedy)]
    print(json.dumps({"process": 0, "sharded": sharded, "reference": reference}), flush=True)


if __name__ == "__main__":
    main()
