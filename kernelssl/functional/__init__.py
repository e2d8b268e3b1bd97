"""Functional forms of the losses and their four ops (docs/api.md).

Each entry point checks its input once (a ``ValueError``/``TypeError`` naming the argument, what was
expected and what came), asks :mod:`kernelssl.dispatch` which implementation serves the call
(``backend="auto" | "triton" | "torch"``, plus the ``KERNELSSL_BACKEND`` environment variable) and
calls it: the torch tier (:mod:`kernelssl.ops`) or the fused kernels (:mod:`kernelssl.triton`).

Ops (one name per op through every tier: ``reference/<op>.py``, ``kernelssl/ops/<op>.py``,
``kernelssl/triton/<op>.py`` and ``<op>_op.py``, ``tests/test_<op>_*.py``):

* :func:`rff_hsic` -- ``(HSIC(Z,Y), HSIC(Z,Z))`` of SSL-HSIC with random Fourier features.
* :func:`legendre_gram_mean` (op ``legendre_gram``) -- SFRIK's ``M(Z) = (1/n^2) sum_ij phi(z_i . z_j)``.
* :func:`taylor_logdet` -- MEC's ``T_n(A, B) = tr sum_k (-1)^(k+1) (lam A B^T)^k / k``.
* :func:`gaussian_gram_logmean` (op ``gaussian_gram``) -- ``log mean_{i != j} exp(2t (z_i . z_j - 1))``,
  and :func:`gram_mean`, the dot-product-kernel Gram mean over a small family of phi
  (:class:`LegendreSeries`, :class:`GaussianPotential`).

Losses: :func:`ssl_hsic_loss`, :func:`sfrik_loss`, :func:`mec_loss`, and Wang & Isola's
:func:`align_uniform_loss` (with :func:`alignment` and :func:`uniformity`, also a metric) -- the
modules in :mod:`kernelssl.losses` wrap these.

Non-finite inputs: NaN/Inf propagate to the outputs (never a silent finite number); pass
``check_finite=True`` to raise a ``ValueError`` instead (costs one host sync per input).

Huge or tiny finite rows: wherever rows are L2-normalised, each non-zero row is first scaled by an
exact power of two (``2^-(floor(log2 max|z_i|) + 1)``, detached: the normalised row and its gradient do not
depend on the scale) so that the sum of squares can neither overflow nor underflow; rows with entries
up to the dtype's maximum, or far below 1e-12, then normalise correctly on every backend.  The scaling
is exact, so results are bitwise unchanged for every row that did not overflow or underflow.

Tensor-valued hyper-parameters (``kernel_scale`` c, MEC's ``lam``): their values are never read on
the host (that would sync).  A value <= 0 (or NaN) makes the result NaN -- via ``torch.where``, no
sync -- instead of a silent number from a meaningless kernel; ``check_finite=True`` raises on it
(one host sync).  Python numbers are checked eagerly, as always.

``torch.func`` (``grad``, ``vmap``, ``jvp``, ...): every op works under the transforms, through its
plain-autograd form (same value; the Gram ops then materialise the n x n Gram).  Meta tensors:
shapes and dtypes propagate through every entry point.

Autocast: every entry point computes in float32 (float64 for float64 inputs) even inside
``torch.autocast``: autocast is switched off for the inputs' device type for the duration of the
call, so no matmul of the loss silently runs in bf16/fp16.  Inputs may be fp16/bf16 (they are upcast
at entry); the scalar comes back in float32, gradients in the input dtype.

Distributed: the losses take ``gather_distributed=True`` to compute every term on the batch gathered
from all ranks (:mod:`kernelssl.distributed`).
"""
from .align_uniform import (
    AlignUniformComponents,
    GaussianPotential,
    LegendreSeries,
    align_uniform_loss,
    alignment,
    gaussian_gram_logmean,
    gram_mean,
    uniformity,
)
from .hsic import (
    KERNELS,
    HSICComponents,
    exact_hsic,
    hsic_loss,
    kernel_scale_objective,
    rff_features,
    rff_hsic,
    sample_gaussian_rff,
    sample_imq_rff,
    sample_laplace_rff,
    sample_rff,
    ssl_hsic_loss,
)
from .mec import MECComponents, exact_logdet, mec_lambda_warmup, mec_loss, min_lambda, taylor_logdet
from .sfrik import SFRIKComponents, legendre_gram_mean, sfrik_loss

__all__ = [
    "rff_hsic",
    "exact_hsic",
    "ssl_hsic_loss",
    "hsic_loss",
    "kernel_scale_objective",
    "sample_rff",
    "sample_imq_rff",
    "sample_gaussian_rff",
    "sample_laplace_rff",
    "KERNELS",
    "rff_features",
    "HSICComponents",
    "legendre_gram_mean",
    "sfrik_loss",
    "SFRIKComponents",
    "taylor_logdet",
    "exact_logdet",
    "min_lambda",
    "mec_loss",
    "mec_lambda_warmup",
    "MECComponents",
    "gaussian_gram_logmean",
    "gram_mean",
    "LegendreSeries",
    "GaussianPotential",
    "uniformity",
    "alignment",
    "align_uniform_loss",
    "AlignUniformComponents",
]
