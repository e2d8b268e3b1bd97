"""Checks every loss module makes when it is built."""
from __future__ import annotations

from .._checks import check_bool, check_choice
from ..dispatch import BACKENDS


def check_common(gather_distributed: bool, backend: str, check_finite: bool) -> None:
    check_choice(backend, "backend", BACKENDS)
    check_bool(gather_distributed, "gather_distributed")
    check_bool(check_finite, "check_finite")
