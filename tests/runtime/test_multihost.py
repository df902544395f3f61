"""Two processes on this CPU machine (jax.distributed + gloo, one device each): the
scheduler on process 0 (LeaderRunner), the tp = 2 step on both (follow); greedy tokens
equal to one unsharded process's."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.xdist_group("mesh")
def test_scheduler_on_process_0_step_everywhere():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    port = _free_port()
    worker = str(ROOT / "tests/runtime/multihost_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, str(i), "2", str(port)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    leader, follower = outs
    assert leader["sharded"] == leader["reference"]
    assert all(len(ids) == 4 for ids in leader["sharded"])
    assert follower["runs"] >= 2  # it ran the steps process 0 scheduled
