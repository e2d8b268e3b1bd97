"""Input validation shared by every loss and op (docs/api.md, "Errors").

Every check raises a ``ValueError`` or ``TypeError`` whose message names the argument, what was
expected and what was given.  The checks look only at metadata (shape, dtype, device): none of them
reads tensor values, so none forces a host sync -- except :func:`check_finite`, which the losses call
only when the user passes ``check_finite=True``.

Non-finite policy (all losses): NaN/Inf in the inputs propagate to a NaN/Inf loss and gradients --
never a silent finite number.  ``check_finite=True`` raises a ``ValueError`` instead (one host sync).
"""
from __future__ import annotations

import argparse
import math
import numbers
import sys
from collections.abc import Sequence

import torch

__all__ = [
    "check_tensor",
    "check_same_shape",
    "check_same_device",
    "check_finite",
    "check_bool",
    "check_int",
    "check_positive",
    "check_choice",
    "check_coefficients",
    "describe",
    "OneLineArgumentParser",
]


class OneLineArgumentParser(argparse.ArgumentParser):
    """The command lines' parser: a usage error is one ``error: ...`` line on stderr and exit status 2
    (argparse's status), never a traceback."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


#: The tensor dtypes every loss and op takes.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_bool(x: object) -> bool:
    return isinstance(x, bool) or type(x).__name__ == "bool_"  # Python's and NumPy's


def describe(x: object) -> str:
    """Short description of a value for error messages."""
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"
    return f"{type(x).__name__} {x!r}"


def check_tensor(
    x: object,
    name: str,
    *,
    ndim: int | None = None,
    min_ndim: int | None = None,
    min_rows: int | None = None,
    min_cols: int | None = None,
) -> torch.Tensor:
    """A floating-point tensor with the given number of dims; ``rows``/``cols`` are dims -2/-1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {describe(x)}")
    if x.dtype not in FLOAT_DTYPES:  # float8 and other floating types have no matmul/reductions here
        raise TypeError(
            f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {x.dtype}"
        )
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(x.shape)} ({x.dim()}-D)")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(
            f"{name}: expected at least {min_ndim} dims, got shape {tuple(x.shape)} ({x.dim()}-D)"
        )
    if min_rows is not None and x.shape[-2] < min_rows:
        raise ValueError(
            f"{name}: expected at least {min_rows} rows (samples) in dim -2, got shape {tuple(x.shape)}"
        )
    if min_cols is not None and x.shape[-1] < min_cols:
        raise ValueError(
            f"{name}: expected at least {min_cols} columns (features) in dim -1, got shape {tuple(x.shape)}"
        )
    return x


def check_same_shape(tensors: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    """All tensors have the shape of the first."""
    ref = tuple(tensors[0].shape)
    for t, n in zip(tensors[1:], names[1:]):
        if tuple(t.shape) != ref:
            raise ValueError(
                f"{n}: expected the same shape as {names[0]} {ref}, got {tuple(t.shape)}"
            )


def check_same_device(tensors: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    """All tensors live on the device of the first."""
    ref = tensors[0].device
    for t, n in zip(tensors[1:], names[1:]):
        if t.device != ref:
            raise ValueError(f"{n}: expected device {ref} (the device of {names[0]}), got {t.device}")


def check_finite(tensors: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    """Raise if any tensor holds NaN or Inf.  Reads values: one host sync per tensor."""
    for t, n in zip(tensors, names):
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{n}: expected finite values (check_finite=True), got {bad} NaN/Inf entries")


def check_bool(x: object, name: str) -> bool:
    """Strictly a Python bool (``True``/``False``): a string such as ``"no"`` or an int is refused,
    so a truthy value of the wrong type can never switch a flag on."""
    if not isinstance(x, bool):
        raise TypeError(f"{name}: expected a bool (True or False), got {describe(x)}")
    return x


def check_int(x: object, name: str, *, minimum: int, maximum: int | None = None) -> int:
    """An integer (``numbers.Integral``: Python's and NumPy's, never a bool) >= minimum (and <= maximum
    when given), returned as a Python int."""
    span = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if _is_bool(x) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name}: expected an int {span}, got {describe(x)}")
    x = int(x)
    if x < minimum or (maximum is not None and x > maximum):
        raise ValueError(f"{name}: expected an int {span}, got {x}")
    return x


def check_positive(x: object, name: str, *, allow_zero: bool = False, minimum: float | None = None,
                   maximum: float | None = None, why: str = "") -> float:
    """A finite real number > 0 (or >= 0), and within ``[minimum, maximum]`` when given (``why``: the
    reason for those bounds, for the message).  Python numbers only (never reads a tensor)."""
    # numbers.Real: Python int/float and NumPy's scalars (np.float32(2.0), np.int64(2)); never bool
    if type(x) is not float and (_is_bool(x) or not isinstance(x, numbers.Real)):
        raise TypeError(f"{name}: expected a positive number, got {describe(x)}")
    ok = x >= 0 if allow_zero else x > 0
    if not ok or x != x or x in (float("inf"),):
        raise ValueError(f"{name}: expected a finite number {'>=' if allow_zero else '>'} 0, got {x}")
    if (minimum is not None and x < minimum) or (maximum is not None and x > maximum):
        span = " and ".join(s for s in (minimum is not None and f">= {minimum:g}",
                                        maximum is not None and f"<= {maximum:g}") if s)
        raise ValueError(f"{name}: expected a number {span}{f' ({why})' if why else ''}, got {x!r}")
    return float(x)


def check_choice(x: object, name: str, choices: Sequence[str]) -> str:
    """One of a fixed set of strings."""
    if x not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(repr(c) for c in choices)}, got {x!r}")
    return x  # type: ignore[return-value]


def check_coefficients(coefficients: object, name: str = "coefficients") -> tuple[float, ...]:
    """A non-empty list/tuple of finite Python numbers (never a tensor: reading one would sync)."""
    if isinstance(coefficients, torch.Tensor) or not isinstance(coefficients, (list, tuple)):
        raise TypeError(f"{name}: expected a sequence of Python floats (b_1, ..., b_L), got {describe(coefficients)}")
    if len(coefficients) < 1:
        raise ValueError(f"{name}: expected at least one coefficient (degree L >= 1), got an empty sequence")
    out = []
    for i, c in enumerate(coefficients):
        if (type(c) is not float and (_is_bool(c) or not isinstance(c, numbers.Real))) or not math.isfinite(c):
            raise TypeError(f"{name}[{i}]: expected a finite Python float, got {describe(c)}")
        out.append(float(c))
    return tuple(out)
