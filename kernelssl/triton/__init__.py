"""The Triton tier: fused kernels, one pair of files per op -- ``<op>.py`` (the kernels, each with its
math above it) and ``<op>_op.py`` (launch configuration, launchers, ``torch.library`` registration and
the entry point :mod:`kernelssl.functional` calls) -- plus the helpers they share (``_common.py``, host
side; ``_jit.py``, device side).

Nothing here is imported by ``import kernelssl``: :func:`kernelssl.dispatch.triton_op` imports an op's
module when the dispatcher first picks this tier, so the package works with no GPU and no Triton.
"""
