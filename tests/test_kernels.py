"""knowstack's kernel path: MKL's strict reproducible mode unless the user chose MKL_CBWR, recorded in world.json."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from knowstack.kernels import DEFAULT_MKL_CBWR, kernel_path, pin_mkl, sums_independent_of_threads

# A matrix product after importing knowstack (and torch before it, as a user's program may): MKL_VERBOSE=1 makes
# MKL print the mode it computed in (CNR:...).
PRODUCT = "import torch, knowstack; a = torch.ones(8, 8); print((a @ a).sum().item())"


def _mkl_mode(**variables: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    env.update(variables, MKL_VERBOSE="1")
    done = subprocess.run([sys.executable, "-c", PRODUCT], env=env, capture_output=True, text=True, check=True)
    modes = [word for line in done.stdout.splitlines() if "GEMM" in line for word in line.split()
             if word.startswith("CNR:")]
    assert modes, done.stdout  # torch's x86 build computes float32 products with MKL
    return modes[0]


def test_mkl_computes_in_strict_mode_unless_the_user_chose() -> None:
    assert "STRICT" in _mkl_mode()  # set on import, in time although torch was imported first
    assert _mkl_mode(MKL_CBWR="") == "CNR:OFF"  # an empty value: MKL's own default


def test_pin_and_record(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MKL_CBWR")
    assert not sums_independent_of_threads()
    pin_mkl()
    assert os.environ["MKL_CBWR"] == DEFAULT_MKL_CBWR and sums_independent_of_threads()
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    pin_mkl()
    assert os.environ["MKL_CBWR"] == "AVX2" and not sums_independent_of_threads()
    recorded = kernel_path()
    assert recorded["mkl_cbwr"] == "AVX2" and recorded["torch_threads"] >= 1
    assert recorded["torch_cpu_capability"] in ("DEFAULT", "VSX", "Z VECTOR", "NO AVX", "AVX2", "AVX512", "SVE256")
