"""Shared test configuration.

Hypothesis profiles: ``ci`` (default; few examples, derandomised so CI is reproducible),
``ci-mid`` (derandomised, enough examples to reach the cancellation points of the normalisation
Jacobian -- q = 2, d = 1, n = 2 -- in a few minutes: CI runs it on the property tests alone,
``-m hypothesis``) and ``thorough`` (many examples, random).  Select with
``HYPOTHESIS_PROFILE=thorough pytest tests``.  The long run (``tests/long_run.py``, docs/numerics.md, "The long run")
drives rff_hsic, legendre_gram and taylor_logdet far beyond these.

The slow tiers (offline sm_90 compiles, whole-command and multi-process runs, the CPU emulation of the
GPU's precision at the paper shapes, the larger cases of the interpreter sweeps) carry
``@pytest.mark.slow``: ``pytest tests`` leaves them out (pytest.ini), ``pytest tests -m slow`` runs them.
"""
import os

import torch

# Without a GPU, Triton kernels run through the CPU interpreter.  Triton reads this when a kernel
# module is imported, so it is set here, before any test imports kernelssl.triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=12, derandomize=True, **_COMMON)
settings.register_profile("ci-mid", max_examples=80, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=300, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Two cores on CI: more threads than cores only slows small ops down.
torch.set_num_threads(min(torch.get_num_threads(), 2))
