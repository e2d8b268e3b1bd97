"""Shared test configuration.

Hypothesis profiles: ``ci`` (default; few examples, derandomised so CI is reproducible),
``ci-mid`` (derandomised, enough examples to reach the cancellation points of issue #16 -- q = 2,
d = 1, n = 2 -- in a few minutes: CI runs it on the property tests alone, ``-m hypothesis``) and
``thorough`` (many examples, random).  Select with ``HYPOTHESIS_PROFILE=thorough pytest tests``.
The long run (``tests/long_run.py``, README "Numerics") drives the three ops far beyond these.
"""
import os

import torch

# Without a GPU, Triton kernels run through the CPU interpreter.  Triton reads this when a kernel
# module is imported, so it is set here, before any test imports kernelssl.triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "ci-mid",
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Two cores on CI: more threads than cores only slows small ops down.
torch.set_num_threads(min(torch.get_num_threads(), 2))
