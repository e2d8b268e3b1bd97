"""The GPU targets (kernelssl/triton/targets.py): what target_of reads from a device, the precision policy
per target, and the dispatch's fallback on devices the kernels cannot serve -- all with faked devices
(no GPU needed); and (slow tier) the offline compile matrix of every op for every target."""
from __future__ import annotations

import types
import warnings

import pytest
import torch

from kernelssl import dispatch
from kernelssl.triton import targets as T

CUDA0 = torch.device("cuda", 0)


def _fake_tensor(dtype=torch.float32, device=CUDA0):
    """What the dispatch reads of an input (device, dtype, requires_grad), on a device we do not have."""
    return types.SimpleNamespace(device=device, dtype=dtype, requires_grad=False)


@pytest.fixture
def fake_cuda(monkeypatch):
    """``fake_cuda(name)``: make every CUDA device's target the known target ``name`` (or a Target)."""
    def use(target):
        t = T.lookup(target) if isinstance(target, str) else target
        monkeypatch.setattr(T, "target_of", lambda device: t if torch.device(device or "cpu").type == "cuda"
                            else T.DEFAULT)
        monkeypatch.setattr(dispatch, "_WARNED", set())
        monkeypatch.setenv(dispatch.ENV_VAR, "auto")
        return t
    return use


# --------------------------------------------------------------------------------------------------
# what a target is
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, smem_kib, warp, default", [
    ("sm_75", 64, 32, "ieee"), ("sm_80", 163, 32, "tf32x3"), ("sm_86", 99, 32, "tf32x3"), ("sm_89", 99, 32, "tf32x3"),
    ("sm_90", 227, 32, "tf32x3"), ("gfx90a", 64, 64, "ieee"), ("gfx942", 64, 64, "ieee")])
def test_target_records(name, smem_kib, warp, default):
    t = T.lookup(name)
    assert (t.smem_per_block, t.warp_size, t.default_precision) == (smem_kib * 1024, warp, default)
    assert t.default_precision in T.ACCURATE and t.default_precision in t.precisions
    assert name in T.MATRIX


def test_lookup_names_the_known_targets():
    with pytest.raises(ValueError, match="target: expected one of .*sm_90.*got 'sm_99'"):
        T.lookup("sm_99")


def _read(monkeypatch, capability=(8, 0), hip=None, arch="", sms=108, name="NVIDIA A100"):
    props = types.SimpleNamespace(multi_processor_count=sms, gcnArchName=arch, name=name)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(T, "_CUDA", {})
    return T.target_of(CUDA0)


def test_target_of_reads_the_device(monkeypatch):
    a100 = _read(monkeypatch, (8, 0), sms=108)
    assert (a100.name, a100.smem_per_block, a100.sms, a100.label) == ("sm_80", 163 * 1024, 108, "NVIDIA A100")
    l4 = _read(monkeypatch, (8, 9), sms=58, name="NVIDIA L4")
    assert (l4.name, l4.smem_per_block, l4.sms) == ("sm_89", 99 * 1024, 58)
    mi300 = _read(monkeypatch, hip="6.2", arch="gfx942:sramecc+:xnack-", sms=304, name="AMD Instinct MI300X")
    assert (mi300.name, mi300.vendor, mi300.warp_size, mi300.default_precision) == ("gfx942", "amd", 64, "ieee")
    blackwell = _read(monkeypatch, (10, 0), sms=148, name="NVIDIA B200")
    assert blackwell.name == "sm_100" and blackwell.name not in T.MATRIX
    # off CUDA: the default target, or the assumed one
    assert T.target_of(torch.device("cpu")) is T.DEFAULT
    with T.assume("sm_75"):
        assert T.target_of("cpu").name == "sm_75"


# --------------------------------------------------------------------------------------------------
# the precision policy
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", T.MATRIX)
def test_default_precision_per_target(fake_cuda, name):
    t = fake_cuda(name)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert dispatch.resolve_precision(None, CUDA0) == t.default_precision
        # torch's TF32 opt-in selects plain tf32 only where the target has it
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dispatch.resolve_precision(None, CUDA0) == ("tf32" if t.tf32 else t.default_precision)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("name, missing", [("sm_75", "tf32x3"), ("sm_75", "bf16x6"), ("gfx90a", "tf32x3"),
                                           ("gfx90a", "tf32"), ("gfx942", "tf32x3")])
def test_explicit_precision_the_target_lacks_raises(fake_cuda, name, missing):
    t = fake_cuda(name)
    with pytest.raises(ValueError, match=rf"input_precision: '{missing}' is not available on {name} .*it has .*"
                                         rf"'{t.default_precision}'"):
        dispatch.resolve_precision(missing, CUDA0)
    assert dispatch.resolve_precision("ieee", CUDA0) == "ieee"  # every target has full fp32


@pytest.mark.slow  # the five ops' CPU emulations at the paper shapes, five precisions each (~1 min)
def test_accurate_precisions_and_amd_defaults_by_emulation():
    """ACCURATE, the precisions the targets' defaults are chosen from, is what the emulation of every op at
    its paper shape finds within 2x of ieee (value and every gradient), among tf32x3 / bf16x6 / bf16x3
    (plain tf32 is the explicit opt-in, never a default); each AMD target's default is the first of its
    precisions, fastest first, that is accurate for every op."""
    import test_gaussian_gram_triton
    import test_gram_hsic_triton
    import test_legendre_gram_triton
    import test_rff_hsic_triton
    import test_taylor_logdet_triton

    from kernelssl.numerics import errors_by_precision, within_2x_of_ieee

    accurate, table = {"ieee", "tf32x3", "bf16x6", "bf16x3"}, {}
    for module in (test_rff_hsic_triton, test_legendre_gram_triton, test_taylor_logdet_triton,
                   test_gaussian_gram_triton, test_gram_hsic_triton):
        run, ref, _ = module.emulated_paper_case()
        errs = errors_by_precision(run, ref, ("ieee", "tf32x3", "bf16x6", "bf16x3"))
        table[module.__name__] = errs
        accurate &= within_2x_of_ieee(errs)
    print(table)
    assert accurate == set(T.ACCURATE), table
    for name in ("gfx90a", "gfx942"):
        t = T.lookup(name)
        assert t.default_precision == next(p for p in t.precisions if p in accurate)


# --------------------------------------------------------------------------------------------------
# the fallback on devices the kernels cannot serve
# --------------------------------------------------------------------------------------------------

_B200 = T.Target("sm_100", "nvidia", 100, "B200", 227 * 1024, 228 * 1024, 65536, 255, 2048, 32, 32, 148,
                 ("tf32x3", "ieee"), True)


def test_auto_on_a_target_outside_the_matrix_runs_torch_with_one_warning(fake_cuda):
    fake_cuda(_B200)
    x = _fake_tensor()
    with pytest.warns(RuntimeWarning, match=r"cannot serve cuda:0 \(cuda:0 is sm_100 \(B200\), not one of the targets"):
        assert dispatch.implementation("legendre_gram", "auto", x) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process and device
        assert dispatch.implementation("gaussian_gram", "auto", x) == "torch"
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run rff_hsic: cuda:0 is sm_100 \(B200\)"):
        dispatch.implementation("rff_hsic", "triton", x)


def test_auto_without_a_compiler_for_the_vendor_runs_torch(fake_cuda, monkeypatch):
    fake_cuda("gfx942")
    monkeypatch.setattr(dispatch, "_TRITON_VENDORS", frozenset({"nvidia"}))
    with pytest.warns(RuntimeWarning, match="the installed Triton has no amd compiler"):
        assert dispatch.implementation("taylor_logdet", "auto", _fake_tensor()) == "torch"
    with pytest.raises(RuntimeError, match="has no amd compiler"):
        dispatch.implementation("taylor_logdet", "triton", _fake_tensor())


def test_bf16_without_a_bf16_matrix_unit_runs_torch(fake_cuda):
    """The stated behaviour for bf16 inputs on sm_75 (no bf16 matrix unit): the torch tier (cuBLAS), with
    one warning; fp16 and fp32 inputs keep the kernels; an explicit backend='triton' raises."""
    fake_cuda("sm_75")
    with pytest.warns(RuntimeWarning, match=r"sm_75 \(T4\) has no bf16 matrix unit \(torch.bfloat16 inputs\)"):
        assert dispatch.implementation("legendre_gram", "auto", _fake_tensor(torch.bfloat16)) == "torch"
    assert dispatch.implementation("legendre_gram", "auto", _fake_tensor(torch.float16)) == "triton"
    assert dispatch.implementation("legendre_gram", "auto", _fake_tensor(torch.float32)) == "triton"
    with pytest.raises(RuntimeError, match="no bf16 matrix unit"):
        dispatch.implementation("legendre_gram", "triton", _fake_tensor(torch.bfloat16))


@pytest.mark.parametrize("name", T.MATRIX)
def test_served_targets_take_the_kernels_silently(fake_cuda, name):
    fake_cuda(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype in (torch.float32, torch.float16):
            assert dispatch.implementation("gaussian_gram", "auto", _fake_tensor(dtype)) == "triton"


# --------------------------------------------------------------------------------------------------
# the offline compile matrix (tests/compile_targets.py; slow: a few minutes per target)
# --------------------------------------------------------------------------------------------------

#: Held in CI (the slow tier): one target of each family the sm_90 tests do not cover -- sm_86 (the
#: 99 KiB parts, sharing sm_89's limits), sm_75 (FMA dots, 64 KiB) and gfx942 (AMD, warp 64, 64 KiB);
#: ``KERNELSSL_FULL_MATRIX=1`` runs all of MATRIX but sm_90 (held by each op's own sm_90 test).
_CI_TARGETS = ("sm_86", "sm_75", "gfx942")


def _matrix_targets():
    import os

    if os.environ.get("KERNELSSL_FULL_MATRIX", "") not in ("", "0"):
        return [t for t in T.MATRIX if t != "sm_90"]
    return list(_CI_TARGETS)


@pytest.mark.slow
@pytest.mark.parametrize("op", dispatch.TRITON_OPS)
@pytest.mark.parametrize("target", _matrix_targets())
def test_compile_matrix(target, op):
    """Every launch the GPU path of ``op`` issues on ``target`` compiles for it, fits its shared memory,
    does not spill (but the dimension-1 variants) and uses its matrix units where Triton has them
    (helpers.target_variants); the fp32 variants take the target's default precision."""
    import helpers

    variants = helpers.target_variants(op, target)
    precisions = {v["constexprs"].get("PRECISION", v["constexprs"].get("INPUT_PRECISION")) for v in variants}
    assert precisions - {None} <= set(T.lookup(target).precisions) | {T.lookup(target).neutral_precision}
