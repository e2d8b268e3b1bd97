"""Accuracy of SSL-HSIC's fused-kernel math at the paper shape (K = 4, B = 4096, d = 256, D = 512) when
every GEMM runs in fp32, in Triton's ``tf32x3`` (``a_hi b_hi + a_hi b_lo + a_lo b_hi`` with the parts
rounded to TF32, fp32 accumulation) or in TF32, against float64 -- emulated on the CPU, to inform
whether ``input_precision="tf32x3"`` may become the kernel's fp32 default (SPEC §4 allows it).  The
tensor cores' own accumulation order and rounding are not modelled: the GPU test
``test_gpu_paper_shape_fp32_vs_float64[tf32x3]`` is the real check.

    python benchmarks/emulate_tf32x3.py      # ~15 s on 2 cores
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernelssl.rff import sample_imq_rff  # noqa: E402



def r_tf32(x):
    """Round fp32 to TF32 (10-bit mantissa), to nearest with ties away, as ``cvt.rna.tf32.f32``."""
    b = x.contiguous().view(torch.int32)
    return ((b + 0x1000) & ~0x1FFF).view(torch.float32)

def mm_fp32(a, b):
    return a @ b


def mm_tf32(a, b):
    return r_tf32(a) @ r_tf32(b)


def mm_tf32x3(a, b):
    ah, bh = r_tf32(a), r_tf32(b)
    al, bl = r_tf32(a - ah), r_tf32(b - bh)
    return (al @ bh + ah @ bl) + ah @ bh



def hsic(x, maps, K, B, mm, dt):
    """(HSIC_ZY, HSIC_ZZ, d(1.7 HSIC_ZY - 2.3 HSIC_ZZ)/dx) as the kernels compute them, GEMMs by mm."""
    N = K * B
    (wa, ba, wb, bb) = [t.to(dt) for t in maps]
    x = x.to(dt)

    def feats(w, b):
        u = mm(x, w.T) + b
        return (2.0 / w.shape[0]) ** 0.5 * torch.cos(u), u
    pa, ua = feats(wa, ba); pb, ub = feats(wb, bb)
    s = pa.reshape(K, B, -1).sum(0); mua, mub = pa.mean(0), pb.mean(0)
    zy = (s - K * mua).square().sum() / (B * K * (K - 1)) + mua.square().sum() / (K - 1)
    cov = mm((pb - mub).T.contiguous(), (pa - mua))
    zz = cov.square().sum() / (N * N)
    gzy, gzz = 1.7, -2.3
    ga = gzy * (2.0 * s.repeat(K, 1) / (B * K * (K - 1)) - (2.0 / N) * mua) + (gzz * 2.0 / (N * N)) * mm((pb - mub).contiguous(), cov)
    gb = (gzz * 2.0 / (N * N)) * mm((pa - mua).contiguous(), cov.T.contiguous())
    gx = 0
    for g, w, u in ((ga, wa, ua), (gb, wb, ub)):
        amp = (2.0 / w.shape[0]) ** 0.5
        gx = gx - mm((g * torch.sin(u)).contiguous(), w) * amp
    return zy, zz, gx


K, B, d, D = 4, 4096, 256, 512
g = torch.Generator().manual_seed(0)
x = torch.nn.functional.normalize(torch.randn(K * B, d, generator=g, dtype=torch.float64), dim=-1)
maps = (*sample_imq_rff(d, D, generator=g), *sample_imq_rff(d, D, generator=g))
maps = [t.double() for t in maps]
t0 = time.time()
ref = hsic(x, maps, K, B, mm_fp32, torch.float64)
for name, mm in (("fp32", mm_fp32), ("tf32x3", mm_tf32x3), ("tf32", mm_tf32)):
    out = hsic(x.float(), [t.float() for t in maps], K, B, mm, torch.float32)
    errs = [float((o.double() - r).abs().max() / r.abs().max()) for o, r in zip(out, ref)]
    print(f"{name:7} rel err  HSIC_ZY {errs[0]:.2e}  HSIC_ZZ {errs[1]:.2e}  grad (max-rel) {errs[2]:.2e}", flush=True)
print("seconds", round(time.time() - t0, 1))
