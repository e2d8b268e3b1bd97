"""Compile the GPU path of a fused op for a GPU target on a machine without one.

The interpreter runs the kernels' arithmetic, but not Triton's GPU compiler: a ``tl.dot`` whose shapes
or operand dtypes the matrix unit cannot take, a precision the target lacks, a layout conversion that
does not fit shared memory, or tiles that spill registers show up only when the kernel is compiled for
a real target.  This script, for one target of :data:`kernelssl.triton.targets.MATRIX` and one op,

1. imports the op's module with ``TRITON_INTERPRET=0`` (the kernels are then real ``JITFunction``\\ s),
2. replaces the ``wrap_triton`` of the op's host module (and of ``_common``) with a recorder and calls
   the op's GPU launchers on CPU tensors taken to be on the target (:func:`kernelssl.triton.targets.assume`:
   the launch configuration, SM count and default precision are the target's) at the shapes of
   :data:`RECIPES` -- every launch the GPU path would issue there is recorded (nothing runs); cases the
   target does not serve (bf16 without a bf16 matrix unit) are left out, and a precision it lacks is
   replaced by its default,
3. specialises each recorded launch exactly as ``JITFunction.run`` would on a GPU (Triton's own
   binder: argument types, 16-byte alignment of pointers, integers equal to 1 or divisible by 16,
   constexprs, options), compiles it with Triton's compiler for the target (NVIDIA: the bundled ptxas,
   ``ptxas -v`` for registers and spills; AMD: the AMDGCN backend, its metadata for VGPRs, spills and
   scratch), and
4. prints one line per distinct variant, ``VARIANT {json}``: kernel, target, its constexprs, registers,
   stack frame, spill stores and loads (bytes), shared memory (bytes) and the target's limit per block,
   and the matrix-unit instructions in the assembly (``tensor_core``; NVIDIA: Hopper's ``wgmma`` and
   ``mma.sync``; AMD: ``v_mfma``); ``ones`` marks the variants of the recipes with dimensions equal to 1
   (the tests require them to compile, but hold only the others to "no spills").  (A 32-byte stack
   frame without spills is the local array of libdevice's slow-path range reduction behind ``tl.sin``
   / ``tl.cos``, not a spill.)  It exits non-zero if any variant fails to compile.

Usage (the tests run it in a subprocess: the pytest process has the interpreter on)::

    TRITON_INTERPRET=0 PYTHONPATH=. python tests/compile_targets.py --target sm_80 legendre_gram

(``--target`` defaults to sm_90; the recording and compiling are :mod:`kernelssl.triton.offline`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from kernelssl.triton import targets as _targets
from kernelssl.triton.offline import (  # noqa: F401  (re-exported for the tests)
    SM90,
    Recorder,
    compile_all,
    programs_per_sm,
    recording,
    rff_hsic_gpu_config,
    tools_available,
    wave_efficiency,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(op: str, target: str = "sm_90", timeout: int = 900, python: str | None = None) -> list[dict]:
    """Run this script for ``op`` on ``target`` in a subprocess (``python``: the interpreter, this one by
    default); the variants it compiled (see the module doc)."""
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([ROOT] + path))
    proc = subprocess.run([python or sys.executable, os.path.abspath(__file__), "--target", target, op],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{target} compile of {op} failed:\n{proc.stderr[-4000:]}")
    return [json.loads(line[len("VARIANT "):]) for line in proc.stdout.splitlines() if line.startswith("VARIANT ")]


def _cases(rows):
    """The recipe's cases (tuples with a dtype and a precision string among other fields) a launch on the
    assumed target can issue: those of a dtype it serves, a precision it lacks replaced by its default
    (duplicates dropped)."""
    import torch

    t = _targets.target_of(None)
    out = []
    for row in rows:
        if any(isinstance(x, torch.dtype) and t.serves(x) is not None for x in row):
            continue
        case = tuple(_prec(x) if isinstance(x, str) else x for x in row)
        if case not in out:
            out.append(case)
    return out


def _dtypes(*dtypes):
    """The dtypes among ``dtypes`` the assumed target serves."""
    return [d for d in dtypes if _targets.target_of(None).serves(d) is None]


def _prec(prec: str) -> str:
    t = _targets.target_of(None)
    return prec if prec in t.precisions else t.default_precision


# --------------------------------------------------------------------------------------------------
# recording the launches of the GPU path
# --------------------------------------------------------------------------------------------------


def _rff_hsic():
    import torch

    from kernelssl.triton import rff_hsic_op as R

    rff_hsic_gpu_config(R)
    # (K, B, d, D): the paper shape; odd sizes; d > 256 (two gradient column blocks); a small D
    # whose cross-covariance is split over the rows.
    for (K, B, d, D), dtype, prec in _cases([((4, 4096, 256, 512), torch.float32, "ieee"),
                                      ((4, 4096, 256, 512), torch.bfloat16, "ieee"),
                                      ((4, 4096, 256, 512), torch.float32, "tf32x3"),
                                      ((4, 4096, 256, 512), torch.float16, "tf32"),
                                      ((3, 1000, 100, 300), torch.float32, "ieee"),
                                      ((3, 1000, 100, 300), torch.bfloat16, "tf32x3"),
                                      ((2, 512, 512, 128), torch.float32, "ieee")]):
        views = torch.empty(K, B, d, dtype=dtype)
        w, b = torch.empty(D, d), torch.empty(D)
        scale = torch.ones(1)
        out = R.rff_hsic_forward(views, w, b, w, b, scale, prec)
        g = torch.ones(())
        R.rff_hsic_backward(g, g, views, w, b, w, b, scale, *out[2:], prec)
    # Dimensions equal to 1 (Triton specialises an int argument == 1 into a constant, which the
    # interpreter never does): the smallest views the API takes, K = B = 2, with d = D = 1.
    Recorder.ones_from = len(Recorder.calls)
    for prec in dict.fromkeys(map(_prec, ("ieee", "tf32x3"))):
        views, w, b, scale = torch.empty(2, 2, 1), torch.empty(1, 1), torch.empty(1), torch.ones(1)
        out = R.rff_hsic_forward(views, w, b, w, b, scale, prec)
        R.rff_hsic_backward(torch.ones(()), torch.ones(()), views, w, b, w, b, scale, *out[2:], prec)
    return R


def _legendre_gram():
    import torch

    from kernelssl.triton import legendre_gram_op as LG

    b3 = (1.0, 40.0, 40.0)
    # The SFRIK headline shape (n = 2048, q = 8192) first in each dtype (its forward launch is the
    # recorded grid of its variant), fp32 in all three precisions (tf32x3 the default); rows whose
    # length is not a multiple of 16 in every dtype (16-byte alignment); a shape with many waves.
    cases = _cases([((2048, 8192), torch.bfloat16, "tf32x3"), ((2048, 8192), torch.float16, "tf32x3"),
                    ((2048, 8192), torch.float32, "tf32x3"), ((2048, 8192), torch.float32, "ieee"),
                    ((2048, 8192), torch.float32, "tf32"), ((2048, 8200), torch.bfloat16, "tf32x3"),
                    ((2048, 8200), torch.float16, "tf32x3"), ((1000, 300), torch.float32, "tf32x3"),
                    ((1000, 300), torch.float32, "ieee"), ((8192, 1024), torch.bfloat16, "tf32x3")])
    for (n, q), dtype, prec in cases:
        z = torch.empty(n, q, dtype=dtype)
        Recorder.tag = f"n{n}-q{q}-{str(dtype)[6:]}-{prec}"
        LG.legendre_gram_forward(z, b3, True, prec)
        LG.legendre_gram_backward(torch.ones(()), z, b3, True, prec)
    Recorder.tag = None
    for dtype in _dtypes(torch.bfloat16):
        LG.legendre_gram_backward(torch.ones(()), torch.empty(4096, 512, dtype=dtype), (1.0, 2.0, 3.0, 4.0, 5.0),
                                  False, _prec("tf32x3"), panel_rows=1024)
    # Dimensions equal to 1 (specialised into constants on a GPU, never by the interpreter): n = 1
    # (the op takes one row), and a last backward panel of one row (row0 = 2, one row left).
    Recorder.ones_from = len(Recorder.calls)
    for dtype in _dtypes(torch.float32, torch.bfloat16):
        z = torch.empty(1, 64, dtype=dtype)
        LG.legendre_gram_forward(z, b3, True, _prec("tf32x3"))
        LG.legendre_gram_backward(torch.ones(()), z, b3, True, _prec("tf32x3"))
    LG.legendre_gram_backward(torch.ones(()), torch.empty(3, 64), b3, True, _prec("tf32x3"), panel_rows=2)
    return LG


def _taylor_logdet():
    import torch

    from kernelssl.triton import taylor_logdet_op as T

    # (m, d), dtype, order, diagnostics, input_precision: the paper shape (fp32 and bf16 with the
    # default tf32x3, fp32 with ieee and tf32), d-space (m > d), the on-chip path (s <= ONCHIP_MAX),
    # order 1, and d-space with rows wider than one tile; bf16 d-space both ways (the split gradient).
    for (m, d), dtype, order, diag, prec in _cases([((1024, 2048), torch.float32, 4, True, "tf32x3"),
                                             ((1024, 2048), torch.bfloat16, 4, False, "tf32x3"),
                                             ((1024, 2048), torch.float32, 4, False, "ieee"),
                                             ((1024, 2048), torch.float32, 4, False, "tf32"),
                                             ((2048, 1024), torch.float32, 5, False, "tf32x3"),
                                             ((2048, 24), torch.float32, 8, True, "tf32x3"),
                                             ((2048, 24), torch.float32, 8, True, "ieee"),
                                             ((256, 512), torch.float32, 1, False, "tf32x3"),
                                             ((1024, 100), torch.float16, 4, False, "tf32x3"),
                                             ((2048, 1024), torch.bfloat16, 4, False, "tf32x3"),
                                             ((1024, 100), torch.bfloat16, 4, False, "tf32x3")]):
        a, b, lam = torch.empty(2, m, d, dtype=dtype), torch.empty(2, m, d, dtype=dtype), torch.ones(2)
        out = T.taylor_logdet_forward(a, b, lam, order, True, diag, prec)
        T.taylor_logdet_backward(torch.ones(2), a, b, lam, *out[2:6], order, True, prec, True, True)
    # Dimensions equal to 1 (specialised into constants on a GPU, never by the interpreter): one pair,
    # one row and/or one column (s = 1), on the on-chip path, for order 1, and m-space with m = 1.
    Recorder.ones_from = len(Recorder.calls)
    for (m, d), dtype, order, diag, prec in _cases([((1, 1), torch.float32, 4, True, "tf32x3"),
                                             ((3, 1), torch.bfloat16, 1, False, "tf32x3"),
                                             ((1, 40), torch.float32, 2, False, "tf32")]):
        a, b, lam = torch.empty(1, m, d, dtype=dtype), torch.empty(1, m, d, dtype=dtype), torch.ones(1)
        out = T.taylor_logdet_forward(a, b, lam, order, True, diag, prec)
        T.taylor_logdet_backward(torch.ones(1), a, b, lam, *out[2:6], order, True, prec, True, True)
    return T


def _gaussian_gram():
    import torch

    from kernelssl.triton import gaussian_gram_op as GG

    # Uniformity's shapes (n = 4096 per view, q = 128; n = 65536: many waves, 128-wide tiles) in each
    # dtype, fp32 in all three precisions (tf32x3 the default); rows whose length is not a multiple of
    # 16 (q = 100, 8200) in every dtype; the diagonal included and raw rows (other constexprs); q = 256
    # (the widest rows-resident backward), q = 200 and 8200 (the panel backward), and the panel backward
    # forced at q = 128 in every dtype.
    for (n, q), dtype, prec, normalize, exclude in _cases([
            ((4096, 128), torch.bfloat16, "tf32x3", True, True), ((4096, 128), torch.float16, "tf32x3", True, True),
            ((4096, 128), torch.float32, "tf32x3", True, True), ((4096, 128), torch.float32, "ieee", True, True),
            ((4096, 128), torch.float32, "tf32", True, True), ((65536, 128), torch.bfloat16, "tf32x3", True, True),
            ((65536, 128), torch.float32, "tf32x3", True, True), ((2048, 100), torch.bfloat16, "tf32x3", True, True),
            ((2048, 100), torch.float16, "tf32x3", True, True), ((2048, 100), torch.float32, "tf32x3", True, True),
            ((2048, 8200), torch.bfloat16, "tf32x3", True, True), ((1000, 128), torch.float32, "tf32x3", False, False),
            ((1000, 128), torch.bfloat16, "tf32x3", True, False), ((4096, 256), torch.bfloat16, "tf32x3", True, True),
            ((4096, 256), torch.float32, "tf32x3", True, True), ((4096, 256), torch.float16, "tf32x3", True, True),
            ((2048, 200), torch.bfloat16, "tf32x3", True, True), ((2048, 200), torch.float32, "tf32x3", True, True)]):
        z = torch.empty(n, q, dtype=dtype)
        Recorder.tag = f"n{n}-q{q}-{str(dtype)[6:]}-{prec}"
        _, stats = GG.gaussian_gram_forward(z, 2.0, normalize, exclude, prec)
        GG.gaussian_gram_backward(torch.ones(()), z, stats, 2.0, normalize, exclude, prec)
    # Wang & Isola's loss: both views stacked in one call (the backward's one split, its epilogue fused)
    for dtype in _dtypes(torch.bfloat16, torch.float32):
        z = torch.empty(2, 4096, 128, dtype=dtype)
        Recorder.tag = f"views2-n4096-q128-{str(dtype)[6:]}"
        _, stats, rinv, proj = GG.gaussian_gram_forward(z, 2.0, True, True, _prec("tf32x3"), return_scales=True)
        GG.gaussian_gram_backward(torch.ones(2), z, stats, 2.0, True, True, _prec("tf32x3"), scales=(rinv, proj))
    for dtype, prec in _cases([(torch.float32, "tf32x3"), (torch.float32, "ieee"), (torch.float32, "tf32"),
                        (torch.bfloat16, "tf32x3"), (torch.float16, "tf32x3")]):
        GG.gaussian_gram_backward(torch.ones(()), torch.empty(4096, 128, dtype=dtype), torch.ones(2), 2.0, True, True,
                                  prec, resident=False)
    Recorder.tag = None
    # Dimensions equal to 1 (specialised into constants on a GPU, never by the interpreter): n = 1 with
    # the diagonal included, q = 1, and a last backward panel of one row (row0 = 2, one row left).
    Recorder.ones_from = len(Recorder.calls)
    for (n, q), dtype, exclude in _cases([((1, 64), torch.float32, False), ((1, 64), torch.bfloat16, False),
                                   ((40, 1), torch.float32, True), ((40, 1), torch.float16, True)]):
        z = torch.empty(n, q, dtype=dtype)
        _, stats = GG.gaussian_gram_forward(z, 2.0, True, exclude, _prec("tf32x3"))
        GG.gaussian_gram_backward(torch.ones(()), z, stats, 2.0, True, exclude, _prec("tf32x3"))
    z = torch.empty(3, 64)
    GG.gaussian_gram_backward(torch.ones(()), z, torch.ones(2), 2.0, True, True, _prec("tf32x3"), panel_rows=2)
    return GG


def _gram_hsic():
    import torch

    from kernelssl.triton import gram_hsic_op as GH

    # The metrics' shapes: 20 000 x 64 against 32 columns, and 100 000 rows (one split), in each fp32
    # precision and both kernels; 256 columns (two backward chunks) and 100 (unaligned rows).
    for (n, dx, dy), code, prec in _cases([  # code: GH.KERNEL_CODES (a string here would read as a precision)
            ((20000, 64, 32), 0, "tf32x3"), ((20000, 64, 32), 1, "tf32x3"), ((20000, 64, 32), 0, "ieee"),
            ((20000, 64, 32), 0, "tf32"), ((100000, 64, 32), 0, "tf32x3"), ((4096, 256, 100), 0, "tf32x3")]):
        kernel = ("gaussian", "imq")[code]
        x, y = torch.empty(n, dx), torch.empty(n, dy)
        Recorder.tag = f"n{n}-dx{dx}-dy{dy}-{kernel}-{prec}"
        GH.gram_hsic_forward(x, y, torch.ones(2), torch.ones(2), kernel, prec)
        GH.gram_hsic_backward(torch.ones(2, 2), torch.ones(2, n), x, y, torch.ones(2), torch.ones(2), kernel, prec)
    Recorder.tag = None
    # Dimensions equal to 1 (specialised into constants on a GPU, never by the interpreter)
    Recorder.ones_from = len(Recorder.calls)
    x, y = torch.empty(40, 1), torch.empty(40, 3)
    GH.gram_hsic_forward(x, y, torch.ones(2), torch.ones(2), "gaussian", _prec("tf32x3"))
    GH.gram_hsic_backward(torch.ones(2, 2), torch.ones(2, 40), x, y, torch.ones(2), torch.ones(2), "gaussian",
                          _prec("tf32x3"))
    return GH


RECIPES = {"rff_hsic": _rff_hsic, "legendre_gram": _legendre_gram, "taylor_logdet": _taylor_logdet,
           "gaussian_gram": _gaussian_gram, "gram_hsic": _gram_hsic}


# --------------------------------------------------------------------------------------------------
# compiling the recorded launches
# --------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Compile the GPU launches of a fused op for a target, offline.")
    parser.add_argument("--target", default="sm_90", choices=list(_targets.TARGETS))
    parser.add_argument("op", choices=list(RECIPES))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run with TRITON_INTERPRET=0 (the kernels must be compiled, not interpreted)")
    with recording(args.op, args.target) as calls:
        RECIPES[args.op]()
    for row in compile_all(calls, Recorder.ones_from, args.target):
        print("VARIANT " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
