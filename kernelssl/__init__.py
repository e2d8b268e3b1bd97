"""kernelssl: kernel-based self-supervised losses -- SSL-HSIC, SFRIK and MEC (and Wang & Isola's
alignment and uniformity on the same ops).

Three tiers per op that agree: ``reference/`` (NumPy float64, in the repository), the torch path
(differentiable, any device) and fused Triton kernels (CUDA).  ``import kernelssl`` needs no GPU and
never imports Triton.

    from kernelssl.losses import HSICLoss, SFRIKLoss, MECLoss, UniformityLoss, AlignUniformLoss
    import kernelssl.functional as KF
"""
__version__ = "0.1.0"

from . import functional, losses
from .losses import AlignUniformLoss, HSICLoss, MECLoss, SFRIKLoss, UniformityLoss

__all__ = [
    "functional", "losses", "HSICLoss", "SFRIKLoss", "MECLoss", "UniformityLoss", "AlignUniformLoss", "__version__",
]
