"""SSL-HSIC torch tier (kernelssl/ops/rff_hsic.py, kernelssl/functional/hsic.py) against the NumPy
reference, and its invariants.

reference <-> rff_hsic <-> rff_hsic_eager in float64 (values and gradients with non-unit upstream
gradients), gradcheck, fp32 / fp16 / bf16, the stop-gradient on the kernel scale, the kernel-scale
objective, symmetry properties, degenerate batches and the exact-kernel limit of the RFF estimators.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernelssl.functional as KF
import reference.rff_hsic as R
from helpers import assert_close, to_numpy
from kernelssl.ops import rff_hsic as H
from kernelssl.ops.rff_hsic import KERNELS, sample_imq_rff, sample_rff

# float64, same formulas in a different order: round-off ~ 1e-16 x (accumulation length < 1e4).
F64_RTOL, F64_ATOL = 1e-10, 1e-12


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _case(seed, K, B, d, D, D_b=None, dtype=torch.float64):
    """Views near the unit sphere (what the loss sees, plus noise) and two independent IMQ maps."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((K, B, d))
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    v += 0.3 * rng.standard_normal((K, B, d))
    g = _gen(seed)
    w_a, b_a = sample_imq_rff(d, D, generator=g, dtype=torch.float64)
    w_b, b_b = sample_imq_rff(d, D if D_b is None else D_b, generator=g, dtype=torch.float64)
    c = float(rng.uniform(0.5, 2.0))
    return torch.tensor(v, dtype=dtype), w_a, b_a, w_b, b_b, c


def _np(*ts):
    return [t.detach().numpy() for t in ts]


def _grad_scale(g):
    return max(float(np.abs(to_numpy(g)).max()), 1e-30)


shapes = st.tuples(
    st.integers(2, 4),  # K
    st.integers(2, 6),  # B
    st.integers(1, 9),  # d (odd and non-power-of-two included)
    st.integers(1, 40),  # D_A
    st.integers(1, 40),  # D_B
    st.integers(0, 2**31 - 1),  # seed
)


# ------------------------------------------------------------------------------------------------
# float64 equivalence with the reference


def test_sqrt_eps_matches_reference_and_guard_values():
    assert H.SQRT_EPS == R.SQRT_EPS == 1e-12
    pts = [-1e-9, 0.0, 1e-300, 1e-8, 0.25]
    x = torch.tensor(pts, dtype=torch.float64, requires_grad=True)
    assert_close(H.sqrt_guard(x), [R.sqrt_guard(a) for a in pts], rtol=1e-15, atol=0, name="sqrt_guard")
    (g,) = torch.autograd.grad(H.sqrt_guard(x).sum(), x)
    assert_close(g, [R.sqrt_guard_grad(a) for a in pts], rtol=1e-14, atol=0, name="guard slope")


@settings(deadline=None)
@given(shapes)
def test_rff_hsic_and_eager_match_reference(shape):
    K, B, d, D, D_b, seed = shape
    views, w_a, b_a, w_b, b_b, c = _case(seed, K, B, d, D, D_b)
    ref = R.rff_hsic(views.numpy(), *_np(w_a, b_a, w_b, b_b), c)
    rng = np.random.default_rng(seed + 1)
    g_zy, g_zz = rng.uniform(-3, 3, size=2)  # non-unit upstream gradients on both outputs
    ref_grad = R.rff_hsic_grad(views.numpy(), *_np(w_a, b_a, w_b, b_b), c, g_zy, g_zz)
    for fn in (H.rff_hsic, H.rff_hsic_eager):
        v = views.clone().requires_grad_()
        zy, zz = fn(v, w_a, b_a, w_b, b_b, c)
        assert zy.dtype == zz.dtype == torch.float64 and zy.shape == zz.shape == ()
        assert_close(zy, ref[0], rtol=F64_RTOL, atol=F64_ATOL, name=f"{fn.__name__} HSIC_ZY")
        assert_close(zz, ref[1], rtol=F64_RTOL, atol=F64_ATOL, name=f"{fn.__name__} HSIC_ZZ")
        (g,) = torch.autograd.grad(g_zy * zy + g_zz * zz, v)
        assert_close(g, ref_grad, rtol=F64_RTOL, atol=F64_ATOL * _grad_scale(ref_grad), name=f"{fn.__name__} grad")


@settings(deadline=None)
@given(shapes, st.sampled_from(KERNELS))
def test_exact_hsic_matches_reference(shape, kernel):
    K, B, d, _, _, seed = shape
    views, *_, c = _case(seed, K, B, d, 1)
    ref = R.exact_hsic(views.numpy(), c, kernel)
    rng = np.random.default_rng(seed + 2)
    g_zy, g_zz = rng.uniform(-3, 3, size=2)
    v = views.clone().requires_grad_()
    zy, zz = H.exact_hsic(v, c, kernel=kernel)
    # same direct-difference distances, different order of the sums: float64 round-off only
    assert_close(zy, ref[0], rtol=F64_RTOL, atol=F64_ATOL, name=f"exact {kernel} HSIC_ZY")
    assert_close(zz, ref[1], rtol=F64_RTOL, atol=F64_ATOL, name=f"exact {kernel} HSIC_ZZ")
    (g,) = torch.autograd.grad(g_zy * zy + g_zz * zz, v)
    ref_grad = R.exact_hsic_grad(views.numpy(), c, g_zy, g_zz, kernel)
    assert_close(g, ref_grad, rtol=1e-9, atol=1e-10 * _grad_scale(ref_grad), name=f"exact {kernel} grad")


@pytest.mark.parametrize("kernel,exact", [("imq", False), ("imq", True), ("gaussian", True), ("laplace", True)])
def test_loss_gradient_matches_reference(kernel, exact):
    views, w_a, b_a, w_b, b_b, c = _case(8, 3, 5, 6, 24)
    gamma, upstream = 3.0, 2.5
    v = views.clone().requires_grad_()
    if not exact:
        zy, zz = H.rff_hsic(v, w_a, b_a, w_b, b_b, c)
        ref_zy, ref_zz = R.rff_hsic(views.numpy(), *_np(w_a, b_a, w_b, b_b), c)
    else:
        zy, zz = H.exact_hsic(v, c, kernel=kernel)
        ref_zy, ref_zz = R.exact_hsic(views.numpy(), c, kernel)
    loss = H.hsic_loss(zy, zz, gamma=gamma)
    assert_close(loss, R.hsic_loss(ref_zy, ref_zz, gamma=gamma), rtol=F64_RTOL, atol=F64_ATOL, name="loss")
    (upstream * loss).backward()
    ref_grad = upstream * R.hsic_loss_grad(
        views.numpy(), c, gamma=gamma, kernel=kernel, exact=exact,
        **dict(zip(("w_a", "b_a", "w_b", "b_b"), _np(w_a, b_a, w_b, b_b))),
    )
    assert_close(v.grad, ref_grad, rtol=1e-9, atol=1e-10 * _grad_scale(ref_grad), name="loss grad")


def test_laplace_exact_gradient_at_tied_coordinates():
    """Tied coordinates (|t| not differentiable at 0): the torch path takes the documented
    subgradient sign(0) = 0, as the reference does (non-unit upstream gradients)."""
    views, *_, c = _case(14, 3, 3, 4, 1)
    views[1, 2] = views[0, 2]  # all coordinates of two views of image 2 tie
    views[2, 0, 1] = views[0, 1, 1]  # one coordinate ties across images
    v = views.clone().requires_grad_()
    zy, zz = H.exact_hsic(v, c, kernel="laplace")
    (g,) = torch.autograd.grad(1.3 * zy - 2.2 * zz, v)
    ref_grad = R.exact_hsic_grad(views.numpy(), c, 1.3, -2.2, "laplace")
    assert_close(g, ref_grad, rtol=1e-9, atol=1e-10 * _grad_scale(ref_grad), name="laplace grad at ties")


# ------------------------------------------------------------------------------------------------
# gradcheck (float64, small shapes)


def test_gradcheck_rff_hsic_all_inputs():
    views, w_a, b_a, w_b, b_b, c = _case(1, 2, 3, 3, 5, 4)
    inputs = tuple(t.clone().requires_grad_() for t in (views, w_a, b_a, w_b, b_b))
    assert torch.autograd.gradcheck(lambda *a: H.rff_hsic(*a, c), inputs)
    assert torch.autograd.gradcheck(lambda *a: H.rff_hsic_eager(*a, c), inputs)


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck_exact_hsic(kernel):
    # (Laplace: random views, no coordinate ties within gradcheck's eps = 1e-6: differentiable there)
    views, *_, c = _case(2, 3, 2, 3, 1)
    assert torch.autograd.gradcheck(lambda v: H.exact_hsic(v, c, kernel=kernel), (views.requires_grad_(),))


@pytest.mark.parametrize("kernel,exact", [("imq", False), ("gaussian", False), ("laplace", False),
                                          ("imq", True), ("gaussian", True), ("laplace", True)])
def test_gradcheck_loss_composition(kernel, exact):
    views, *_, c = _case(3, 2, 3, 4, 6)
    g = _gen(33)
    w_a, b_a = sample_rff(kernel, 4, 6, generator=g, dtype=torch.float64)
    w_b, b_b = sample_rff(kernel, 4, 6, generator=g, dtype=torch.float64)

    def f(v):
        zy, zz = H.exact_hsic(v, c, kernel=kernel) if exact else H.rff_hsic(v, w_a, b_a, w_b, b_b, c)
        return H.hsic_loss(zy, zz, gamma=3.0)

    assert torch.autograd.gradcheck(f, (views.requires_grad_(),))


# ------------------------------------------------------------------------------------------------
# precision


@pytest.mark.parametrize("fn", [H.rff_hsic, H.rff_hsic_eager, "exact"])
def test_float32_against_float64(fn):
    """fp32 vs float64 on K=4, B=16, d=32, D=256 (N = 64).

    Phase error: |W x / c| <~ 30 carries ~ 30 x 6e-8 x sqrt(d) ~ 1e-5 absolute in fp32, which is also
    the relative error of each feature entry; the sums over N*D <= 16384 terms add ~ sqrt(N D) u.
    So 1e-4 relative (+ 1e-6 absolute for terms near 0) for the values, and 1e-4 of the largest
    gradient entry for the gradients.
    """
    views, w_a, b_a, w_b, b_b, c = _case(4, 4, 16, 32, 256)
    rng = np.random.default_rng(4)
    g_zy, g_zz = rng.uniform(0.5, 3, size=2) * [1, -1]
    out = {}
    for dt in (torch.float64, torch.float32):
        v = views.to(dt).requires_grad_()
        maps = [t.to(dt) for t in (w_a, b_a, w_b, b_b)]
        zy, zz = H.exact_hsic(v, c) if fn == "exact" else fn(v, *maps, c)
        assert zy.dtype == zz.dtype == dt
        (g,) = torch.autograd.grad(g_zy * zy + g_zz * zz, v)
        assert g.dtype == dt
        out[dt] = (zy, zz, g)
    for k, name in enumerate(("HSIC_ZY", "HSIC_ZZ")):
        assert_close(out[torch.float32][k], out[torch.float64][k], rtol=1e-4, atol=1e-6, name=name)
    g64 = out[torch.float64][2]
    assert_close(out[torch.float32][2], g64, rtol=1e-4, atol=1e-4 * _grad_scale(g64), name="grad")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fn", [H.rff_hsic, H.rff_hsic_eager, "exact"])
def test_half_inputs_give_float32_results_and_input_dtype_grads(dtype, fn):
    views, w_a, b_a, w_b, b_b, c = _case(5, 2, 8, 10, 64)
    v = views.to(dtype).requires_grad_()
    maps = [t.float() for t in (w_a, b_a, w_b, b_b)]
    call = (lambda x: H.exact_hsic(x, c)) if fn == "exact" else (lambda x: fn(x, *maps, c))
    zy, zz = call(v)
    assert zy.dtype == zz.dtype == torch.float32
    loss = H.hsic_loss(zy, zz)
    assert loss.dtype == torch.float32
    (g,) = torch.autograd.grad(2.5 * loss, v)
    assert g.dtype == dtype
    # half inputs are upcast at entry and nothing else changes: bitwise the fp32 path on the upcast
    v32 = v.detach().float().requires_grad_()
    zy32, zz32 = call(v32)
    assert torch.equal(zy, zy32) and torch.equal(zz, zz32)
    (g32,) = torch.autograd.grad(2.5 * H.hsic_loss(zy32, zz32), v32)
    assert torch.equal(g, g32.to(dtype))


# ------------------------------------------------------------------------------------------------
# kernel scale: stop-gradient in the HSIC terms, and the side objective


@pytest.mark.parametrize("fn", [H.rff_hsic, H.rff_hsic_eager, "exact"])
def test_kernel_scale_is_not_differentiated_through_hsic(fn):
    views, w_a, b_a, w_b, b_b, c = _case(6, 2, 4, 3, 16)
    ct = torch.tensor(c, dtype=torch.float64, requires_grad=True)
    call = (lambda x, s: H.exact_hsic(x, s)) if fn == "exact" else (lambda x, s: fn(x, w_a, b_a, w_b, b_b, s))
    # only c requires grad: the outputs are constants
    zy, zz = call(views, ct)
    assert not zy.requires_grad and not zz.requires_grad
    # views and c require grad: backward reaches the views only
    v = views.clone().requires_grad_()
    zy, zz = call(v, ct)
    (1.3 * H.hsic_loss(zy, zz)).backward()
    assert v.grad is not None and ct.grad is None
    # a tensor c gives the same values as the float
    zy_f, zz_f = call(views, c)
    assert torch.equal(zy.detach(), zy_f) and torch.equal(zz.detach(), zz_f)


def _strided_pairs(n, num_pairs):
    """The documented deterministic choice, rewritten independently."""
    m = max(1, int(round(math.sqrt(num_pairs))))
    idx = [(t * n) // (2 * m) for t in range(2 * m)]
    return idx[0::2], idx[1::2]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("num_pairs", [1024, 50, 1])
def test_kernel_scale_objective_deterministic_pairs_match_reference(num_pairs, kernel):
    views, *_ = _case(7, 3, 20, 5, 1)
    N = 60
    i, j = _strided_pairs(N, num_pairs)
    x = views.reshape(N, 5).numpy()
    if kernel == "laplace":  # the l1 distance, the variable the Laplace kernel is a function of
        rho = np.array([[np.sum(np.abs(x[a] - x[b])) for b in j] for a in i])
    else:
        rho = np.array([[np.sum((x[a] - x[b]) ** 2) for b in j] for a in i])
    v = views.clone().requires_grad_()
    c = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    obj = H.kernel_scale_objective(v, c, num_pairs=num_pairs, kernel=kernel)
    assert obj.dtype == torch.float64 and obj.shape == ()
    assert_close(obj, R.scale_objective(rho, 0.8, kernel), rtol=F64_RTOL, atol=F64_ATOL, name="objective")
    (3.0 * obj).backward()
    assert_close(c.grad, 3.0 * R.scale_objective_grad(rho, 0.8, kernel), rtol=F64_RTOL, atol=F64_ATOL, name="d/dc")
    assert v.grad is None  # rho is computed without gradient to the embeddings
    if 2 * len(i) <= N:
        assert min(rho.ravel()) > 0  # the strided i and j sets are disjoint: no self-distances


def test_kernel_scale_objective_with_generator():
    views, *_ = _case(8, 2, 16, 4, 1)
    N = 32
    m = 6  # round(sqrt(37))
    u = torch.rand((2, m), generator=_gen(42), dtype=torch.float64)  # the documented draw: i, j = floor(u N)
    i, j = (u * N).long()
    x = views.reshape(N, 4)
    rho = ((x[i][:, None] - x[j][None]) ** 2).sum(-1).numpy()
    c = torch.tensor(1.4, dtype=torch.float64, requires_grad=True)
    obj = H.kernel_scale_objective(views, c, num_pairs=37, generator=_gen(42))
    assert_close(obj, R.scale_objective(rho, 1.4), rtol=F64_RTOL, atol=F64_ATOL, name="objective")
    obj.backward()
    assert_close(c.grad, R.scale_objective_grad(rho, 1.4), rtol=F64_RTOL, atol=F64_ATOL, name="d/dc")
    again = H.kernel_scale_objective(views, 1.4, num_pairs=37, generator=_gen(42))
    assert torch.equal(again, obj.detach())  # reproducible; a float c gives a constant
    assert not again.requires_grad
    drawn = H.draw_scale_pairs(37, _gen(42), "cpu")  # drawn beforehand: the same pairs
    assert torch.equal(H.kernel_scale_objective(views, 1.4, num_pairs=37, pairs=drawn), again)


def test_kernel_scale_objective_dtypes():
    views, *_ = _case(9, 2, 8, 4, 1)
    c = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        obj = H.kernel_scale_objective(views.to(dt).requires_grad_(), c, num_pairs=16)
        assert obj.dtype == torch.float32
        (g,) = torch.autograd.grad(obj, c)
        assert g.dtype == torch.float64


# ------------------------------------------------------------------------------------------------
# properties


def _both(views, maps, c, kernel):
    """``kernel``: "rff" (the maps given) or an exact family's name."""
    return H.rff_hsic(views, *maps, c) if kernel == "rff" else H.exact_hsic(views, c, kernel=kernel)


@settings(deadline=None)
@given(shapes, st.sampled_from(("rff",) + KERNELS), st.randoms(use_true_random=False))
def test_view_and_batch_permutation_invariance(shape, kernel, rnd):
    K, B, d, D, D_b, seed = shape
    views, w_a, b_a, w_b, b_b, c = _case(seed, K, B, d, D, D_b)
    maps = (w_a, b_a, w_b, b_b)
    base = _both(views, maps, c, kernel)
    pv = list(range(K))
    rnd.shuffle(pv)
    pb = list(range(B))
    rnd.shuffle(pb)
    for permuted, what in ((views[pv], "views"), (views[:, pb], "images")):
        out = _both(permuted, maps, c, kernel)
        for a, e, name in zip(out, base, ("HSIC_ZY", "HSIC_ZZ")):
            assert_close(a, e, rtol=F64_RTOL, atol=F64_ATOL, name=f"{kernel} {name}, permuted {what}")


@settings(deadline=None)
@given(shapes, st.sampled_from(("imq", "gaussian")))
def test_exact_kernel_rotation_invariance(shape, kernel):
    """A joint orthogonal rotation of every embedding leaves the exact terms unchanged (Euclidean
    distances; IMQ and Gaussian)."""
    K, B, d, _, _, seed = shape
    views, *_, c = _case(seed, K, B, d, 1)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    rotated = views @ torch.from_numpy(q)
    for a, e, name in zip(H.exact_hsic(rotated, c, kernel=kernel), H.exact_hsic(views, c, kernel=kernel),
                          ("HSIC_ZY", "HSIC_ZZ")):
        # distances of rotated points: ~1e-16 x ||z||^2 per entry
        assert_close(a, e, rtol=1e-9, atol=1e-12, name=name)


@settings(deadline=None)
@given(shapes, st.randoms(use_true_random=False))
def test_exact_laplace_signed_permutation_invariance(shape, rnd):
    """The l1 distance is invariant under permuting and sign-flipping coordinates (jointly for every
    embedding), and under a joint translation: the exact Laplace terms do not change -- exactly, as
    the same |differences| are summed in another order (float64 round-off only)."""
    K, B, d, _, _, seed = shape
    views, *_, c = _case(seed, K, B, d, 1)
    perm = list(range(d))
    rnd.shuffle(perm)
    signs = torch.tensor([rnd.choice((-1.0, 1.0)) for _ in range(d)], dtype=torch.float64)
    moved = views[..., perm] * signs + 0.25
    for a, e, name in zip(H.exact_hsic(moved, c, kernel="laplace"), H.exact_hsic(views, c, kernel="laplace"),
                          ("HSIC_ZY", "HSIC_ZZ")):
        assert_close(a, e, rtol=1e-9, atol=1e-12, name=name)


@settings(deadline=None)
@given(shapes, st.sampled_from(["duplicate", "collapsed", "two_views_two_images"]))
def test_degenerate_inputs_give_finite_loss_and_gradients(shape, kind):
    K, B, d, D, D_b, seed = shape
    if kind == "two_views_two_images":
        K, B = 2, 2
    views, w_a, b_a, w_b, b_b, c = _case(seed, K, B, d, D, D_b)
    if kind == "duplicate":
        views[:, -1] = views[:, 0]  # image B-1 duplicates image 0 in every view
        views[1, 0] = views[0, 0]  # and two views of image 0 coincide
    elif kind == "collapsed":
        views[:] = views[0, 0]
    for kernel in ("rff",) + KERNELS:
        v = views.clone().requires_grad_()
        zy, zz = _both(v, (w_a, b_a, w_b, b_b), c, kernel)
        loss = H.hsic_loss(zy, zz)
        (g,) = torch.autograd.grad(2.5 * loss, v)
        assert torch.isfinite(loss) and bool(torch.isfinite(g).all()), (kernel, kind)
        if kind == "collapsed":
            assert abs(zz.item()) <= 1e-24  # centred features / centred kernel are ~0
            # HSIC_ZZ's gradient vanishes there, even after the guard's slope (<= 5e5): the loss
            # gradient is that of -HSIC_ZY alone (which is 0 for the exact kernel: k is flat at x = y)
            v2 = views.clone().requires_grad_()
            (g_zy,) = torch.autograd.grad(-2.5 * _both(v2, (w_a, b_a, w_b, b_b), c, kernel)[0], v2)
            assert_close(g, g_zy, rtol=0, atol=1e-9, name=f"{kernel} collapsed grad")
            if kernel != "rff":  # Laplace too: the subgradient sign(0) = 0
                assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-12, name=f"exact {kernel} collapsed grad")


def test_collapsed_batch_closed_forms():
    """All rows equal to z: exact HSIC_ZY = K/(K-1) - 1 = 1/(K-1); RFF HSIC_ZY = ||phi_A(z)||^2/(K-1)."""
    K, B, d = 3, 5, 4
    views, w_a, b_a, w_b, b_b, c = _case(10, K, B, d, 32)
    views[:] = views[0, 0]
    zy, zz = H.exact_hsic(views, c)
    assert_close(zy, 1.0 / (K - 1), rtol=1e-14, atol=1e-15, name="exact HSIC_ZY")
    phi = R.rff_features(views[0, :1].numpy(), w_a.numpy(), b_a.numpy(), c)[0]
    zy_rff, zz_rff = H.rff_hsic(views, w_a, b_a, w_b, b_b, c)
    assert_close(zy_rff, phi @ phi / (K - 1), rtol=1e-12, atol=1e-15, name="RFF HSIC_ZY")
    loss = H.hsic_loss(zy_rff, zz_rff)
    # sqrt_guard(~0) = 1e-6: the guard's maximal shift
    assert_close(loss, 3.0 * 1e-6 - phi @ phi / (K - 1), rtol=1e-12, atol=1e-15, name="loss")


def test_no_grad_and_inputs_without_grad():
    views, w_a, b_a, w_b, b_b, c = _case(11, 2, 5, 3, 16)
    ref = H.rff_hsic(views.clone().requires_grad_(), w_a, b_a, w_b, b_b, c)
    for fn in (H.rff_hsic, H.rff_hsic_eager):
        with torch.no_grad():
            a = fn(views.clone().requires_grad_(), w_a, b_a, w_b, b_b, c)
        b = fn(views, w_a, b_a, w_b, b_b, c)  # requires_grad=False everywhere
        for out in (a, b):
            assert not out[0].requires_grad and not out[1].requires_grad
            assert_close(out[0], ref[0], rtol=F64_RTOL, atol=F64_ATOL, name="HSIC_ZY")
            assert_close(out[1], ref[1], rtol=F64_RTOL, atol=F64_ATOL, name="HSIC_ZZ")
            assert torch.isfinite(H.hsic_loss(*out))
    with torch.no_grad():
        zy, zz = H.exact_hsic(views, c)
        obj = H.kernel_scale_objective(views, torch.tensor(c, requires_grad=True))
    assert not zy.requires_grad and not obj.requires_grad and torch.isfinite(obj)


# ------------------------------------------------------------------------------------------------
# the exact-kernel limit of the RFF estimators


@pytest.mark.parametrize("kernel", KERNELS)
def test_rff_terms_converge_to_exact_terms(kernel):
    """E over the maps of the RFF terms is the exact terms.  Write a = sqrt(2) cos(u) (N, D), so that
    Phi = a / sqrt(D) and K_A = Phi_A Phi_A^T = mean_j a_j a_j^T with E[a_j a_j^T] = Kex.

    HSIC_ZY is the mean over the D features of T_j = (1/(BK(K-1))) sum_i (sum_v a_ivj)^2 - (mean_n a_nj)^2,
      with T_j in [0, 2K/(K-1)] (lower: the cancellation-free form is a sum of squares; upper:
      |sum_v a| <= K sqrt(2)).  Hoeffding: |err| <= (2K/(K-1)) s, s = sqrt(ln(2/delta') / (2D)).
    HSIC_ZZ = tr(K_A H K_B H)/N^2 with K_A = Kex + E_A, K_B = Kex + E_B independent, so
      err = L_A + L_B + Q, L_A = tr(E_A M) = mean_j a_j^T M a_j - tr(Kex M), M = H Kex H / N^2 (PSD),
      Q = tr(E_A H E_B H)/N^2.  a_j^T M a_j lies in [0, 2N lambda_max(M)] -> Hoeffding 2N lambda_max(M) s
      for each of L_A, L_B; |Q| <= ||E_A||_F ||E_B||_F / N^2 <= eps_A eps_B with eps the largest entry
      error, an average of D terms in [-2, 2]: eps <= sqrt(8 ln(2N^2/delta') / D) (union over N^2 entries).
    These hold with probability >= 1 - 1e-6 overall: delta' = 1e-6 / (5 events x (D, seed) cases).
    They are loose (worst-case ranges), so the variance-based version is asserted too: the mean of
    the iid summands (T_j, and a_j^T M a_j for L_A, L_B) within 6 standard errors of its expectation
    (CLT; the seeds are fixed), and the error shrinks with D (expected ratio sqrt(4096/256) = 4; at
    least 2 asserted, on the mean over the seeds).  Nothing above depends on the kernel family beyond
    ``0 <= k <= 1`` and a uniform phase: the same bounds hold for each sampler (docs/rff_hsic.md).
    """
    K, B, d = 2, 4, 3
    N = K * B
    views, *_ = _case(12, K, B, d, 1)
    c = 1.0
    zy_ex, zz_ex = (t.item() for t in H.exact_hsic(views, c, kernel=kernel))
    x = views.reshape(N, d).numpy()
    kex = R.kernel_matrix(x, x, c, kernel)
    Hc = np.eye(N) - np.ones((N, N)) / N
    M = Hc @ kex @ Hc / N**2
    lam = np.linalg.eigvalsh(M).max()
    Ds, seeds = (256, 1024, 4096), range(4)
    dp = 1e-6 / (5 * len(Ds) * len(seeds))
    mean_err = {}
    for D in Ds:
        s = math.sqrt(math.log(2 / dp) / (2 * D))
        eps = math.sqrt(8 * math.log(2 * N * N / dp) / D)
        bound_zy = 2 * K / (K - 1) * s
        bound_zz = 2 * (2 * N * lam * s) + eps * eps
        errs = []
        for seed in seeds:
            g = _gen(1000 + 10 * D + seed)
            w_a, b_a = sample_rff(kernel, d, D, generator=g, dtype=torch.float64)
            w_b, b_b = sample_rff(kernel, d, D, generator=g, dtype=torch.float64)
            zy, zz = (t.item() for t in H.rff_hsic(views, w_a, b_a, w_b, b_b, c))
            assert abs(zy - zy_ex) <= bound_zy, (D, seed, zy, zy_ex, bound_zy)
            assert abs(zz - zz_ex) <= bound_zz, (D, seed, zz, zz_ex, bound_zz)
            # variance-based: the iid summands
            a = math.sqrt(D) * R.rff_features(x, w_a.numpy(), b_a.numpy(), c)  # (N, D)
            b = math.sqrt(D) * R.rff_features(x, w_b.numpy(), b_b.numpy(), c)
            T = np.sum(a.reshape(K, B, D).sum(0) ** 2, axis=0) / (B * K * (K - 1)) - a.mean(0) ** 2
            assert_close(T.mean(), zy, rtol=1e-12, atol=1e-14, name="HSIC_ZY = mean_j T_j")
            assert abs(zy - zy_ex) <= 6 * T.std() / math.sqrt(D), (D, seed)
            for feats in (a, b):
                q = np.einsum("nj,nm,mj->j", feats, M, feats)
                assert abs(q.mean() - np.trace(kex @ M)) <= 6 * q.std() / math.sqrt(D), (D, seed)
            errs.append(abs(zy - zy_ex) + abs(zz - zz_ex))
        mean_err[D] = float(np.mean(errs))
    assert mean_err[4096] <= mean_err[256] / 2, mean_err


# ------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_raises_with_the_argument_name():
    """The functional API checks the inputs (once) before calling the torch tier."""
    views, w_a, b_a, w_b, b_b, c = _case(13, 2, 3, 4, 8)
    with pytest.raises(ValueError, match="views"):
        KF.rff_hsic(views[0], w_a, b_a, w_b, b_b, c)  # 2-D
    with pytest.raises(ValueError, match="K >= 2"):
        KF.rff_hsic(views[:1], w_a, b_a, w_b, b_b, c)
    with pytest.raises(ValueError, match="views"):
        KF.exact_hsic(views[:, :1], c)  # B = 1
    with pytest.raises(TypeError, match="views"):
        KF.rff_hsic(views.long(), w_a, b_a, w_b, b_b, c)
    with pytest.raises(ValueError, match="w_b"):
        KF.rff_hsic(views, w_a, b_a, w_b[:, :3], b_b, c)
    with pytest.raises(ValueError, match="b_a"):
        KF.rff_hsic(views, w_a, b_a[:3], w_b, b_b, c)
    with pytest.raises(ValueError, match="kernel_scale"):
        KF.rff_hsic(views, w_a, b_a, w_b, b_b, -1.0)
    with pytest.raises(TypeError, match="kernel_scale"):
        KF.exact_hsic(views, torch.ones(2))
    with pytest.raises(ValueError, match="device"):
        KF.rff_hsic(views, w_a.to("meta"), b_a, w_b, b_b, c)
    with pytest.raises(ValueError, match="num_pairs"):
        KF.kernel_scale_objective(views, c, num_pairs=0)
    with pytest.raises(ValueError, match=r"kernel: expected one of 'imq', 'gaussian', 'laplace', got 'gauss'"):
        KF.exact_hsic(views, c, kernel="gauss")
    with pytest.raises(TypeError, match="kernel: expected a str"):
        KF.exact_hsic(views, c, kernel=None)
    with pytest.raises(ValueError, match="kernel"):
        KF.kernel_scale_objective(views, c, kernel="rff")  # a method name is not a kernel family
