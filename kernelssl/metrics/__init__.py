"""Representation similarity: HSIC and CKA between two representations (docs/metrics.md).

    from kernelssl.metrics import hsic, cka, MinibatchCKA

``hsic``/``cka`` take ``x (n, dx)``, ``y (n, dy)``; linear, Gaussian and IMQ kernels, biased and
unbiased estimators, exact (streamed, no ``n x n`` matrix) or random features.  ``MinibatchCKA``
accumulates unbiased HSICs over minibatches for the CKA matrix between two lists of layers.
"""
from .minibatch import MinibatchCKA
from .similarity import KERNELS, cka, hsic, median_sigma

__all__ = ["hsic", "cka", "median_sigma", "MinibatchCKA", "KERNELS"]
