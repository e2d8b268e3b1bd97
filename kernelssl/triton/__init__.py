"""Fused Triton kernels, one file per op (kernels, launchers and ``torch.library`` registration).

Nothing here is imported by ``import kernelssl``: the dispatcher (``kernelssl._backend``) imports a
kernel module only when a Triton backend is selected, so the package works with no GPU and no
Triton.  The kernels land with the kernel issues; until then ``backend="triton"`` raises with the
reason and ``backend="auto"`` uses the torch path.
"""
