"""Accuracy of SSL-HSIC's fused-kernel math at the paper shape (K = 4, B = 4096, d = 256, D = 512:
:data:`kernelssl.bench.cases.PAPER_SHAPES`) when every GEMM runs in fp32, in Triton's ``tf32x3``
(``a_hi b_hi + a_hi b_lo + a_lo b_hi``: the big parts rounded to TF32, the small ones truncated by the
MMA, fp32 accumulation) or in TF32, against float64 -- emulated on the CPU (:func:`kernelssl.numerics.mm`):
the case for ``input_precision="tf32x3"`` as the kernel's fp32 default (docs/numerics.md).  The tensor
cores' own accumulation order and rounding are not modelled: the GPU test
``tests/test_rff_hsic_triton.py::test_gpu_paper_shape_fp32_vs_float64[tf32x3]`` is the real check.
Run from the repository root::

    PYTHONPATH=. python benchmarks/emulate_tf32x3.py      # ~15 s on 2 cores
"""
import time

import torch

from kernelssl.bench.cases import PAPER_SHAPES
from kernelssl.numerics import mm as emulated_mm
from kernelssl.ops.rff_hsic import sample_imq_rff


def mm_fp32(a, b):
    return a @ b


def mm_tf32(a, b):
    return emulated_mm(a, b, "tf32")


def mm_tf32x3(a, b):
    return emulated_mm(a, b, "tf32x3")


def hsic(x, maps, K, B, mm, dt):
    """(HSIC_ZY, HSIC_ZZ, d(1.7 HSIC_ZY - 2.3 HSIC_ZZ)/dx) as the kernels compute them, GEMMs by mm."""
    N = K * B
    (wa, ba, wb, bb) = [t.to(dt) for t in maps]
    x = x.to(dt)

    def feats(w, b):
        u = mm(x, w.T) + b
        return (2.0 / w.shape[0]) ** 0.5 * torch.cos(u), u

    pa, ua = feats(wa, ba)
    pb, ub = feats(wb, bb)
    s = pa.reshape(K, B, -1).sum(0)
    mua, mub = pa.mean(0), pb.mean(0)
    zy = (s - K * mua).square().sum() / (B * K * (K - 1)) + mua.square().sum() / (K - 1)
    cov = mm((pb - mub).T.contiguous(), (pa - mua))
    zz = cov.square().sum() / (N * N)
    gzy, gzz = 1.7, -2.3
    ga = (gzy * (2.0 * s.repeat(K, 1) / (B * K * (K - 1)) - (2.0 / N) * mua)
          + (gzz * 2.0 / (N * N)) * mm((pb - mub).contiguous(), cov))
    gb = (gzz * 2.0 / (N * N)) * mm((pa - mua).contiguous(), cov.T.contiguous())
    gx = 0
    for g, w, u in ((ga, wa, ua), (gb, wb, ub)):
        amp = (2.0 / w.shape[0]) ** 0.5
        gx = gx - mm((g * torch.sin(u)).contiguous(), w) * amp
    return zy, zz, gx


def main() -> None:
    K, B, d, D = (PAPER_SHAPES["hsic"][k] for k in ("K", "B", "d", "D"))
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(K * B, d, generator=g, dtype=torch.float64), dim=-1)
    maps = (*sample_imq_rff(d, D, generator=g), *sample_imq_rff(d, D, generator=g))
    maps = [t.double() for t in maps]
    t0 = time.time()
    ref = hsic(x, maps, K, B, mm_fp32, torch.float64)
    for name, mm in (("fp32", mm_fp32), ("tf32x3", mm_tf32x3), ("tf32", mm_tf32)):
        out = hsic(x.float(), [t.float() for t in maps], K, B, mm, torch.float32)
        errs = [float((o.double() - r).abs().max() / r.abs().max()) for o, r in zip(out, ref)]
        print(f"{name:7} rel err  HSIC_ZY {errs[0]:.2e}  HSIC_ZZ {errs[1]:.2e}  grad (max-rel) {errs[2]:.2e}",
              flush=True)
    print("seconds", round(time.time() - t0, 1))


if __name__ == "__main__":
    main()
