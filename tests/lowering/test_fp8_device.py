"""check_fp8_device (jaxrt/lowering/xla/quant.py): fp8 activations (quantized dots of
fp8 and fp8-weight's w8a8 kin) need a GPU of compute capability 8.9 or later. The GPUs are
stand-ins for what jax.devices() returns (platform, device_kind, compute_capability), so
the refusal is tested without one; the CPU case uses this machine's own device too."""
from __future__ import annotations

from types import SimpleNamespace

import jax
import pytest

from jaxrt.errors import SettingError
from jaxrt.lowering.xla import quant


def _only_device(monkeypatch, **device) -> None:
    fake = SimpleNamespace(**device)
    monkeypatch.setattr(quant, "jax", SimpleNamespace(devices=lambda *a, **k: [fake]))


@pytest.mark.parametrize("kind, cc", [
    ("NVIDIA A100-SXM4-80GB", "8.0"),  # Ampere
    ("NVIDIA GeForce RTX 3090", "8.6"),  # same major as Ada: compared as (8, 6) < (8, 9)
    ("Tesla V100-SXM2-16GB", "7.0")])
def test_a_gpu_older_than_8_9_is_refused(monkeypatch, kind, cc):
    _only_device(monkeypatch, platform="gpu", device_kind=kind, compute_capability=cc)
    with pytest.raises(SettingError) as e:
        quant.check_fp8_device()
    message = str(e.value)
    assert message == (f"fp8 activations need a GPU of compute capability 8.9 or later; "
                       f"{kind} is {cc} (use fp8-weight)")


@pytest.mark.parametrize("kind, cc", [
    ("NVIDIA L40S", "8.9"),  # Ada: the first with fp8 tensor cores
    ("NVIDIA H100 80GB HBM3", "9.0"),
    ("NVIDIA B200", "10.0")])  # "10.0" < "8.9" as strings: compared as numbers
def test_ada_hopper_and_later_are_accepted(monkeypatch, kind, cc):
    _only_device(monkeypatch, platform="gpu", device_kind=kind, compute_capability=cc)
    quant.check_fp8_device()  # no error


def test_cpu_is_accepted(monkeypatch):
    if jax.devices()[0].platform == "cpu":
        quant.check_fp8_device()  # this machine's own device
    # a CPU device has no compute capability: never read
    _only_device(monkeypatch, platform="cpu", device_kind="cpu")
    quant.check_fp8_device()
