"""Side-by-side implementations of each loss on the same inputs, for the main job and the benchmarks.

``implementations(loss, ...)`` returns ``{name: fn}`` where every ``fn(*inputs)`` computes the same
scalar loss with the papers' default hyper-parameters:

* ``"torch"`` -- the library's torch path through the public functional API (``backend="torch"``);
* ``"eager"`` -- the form the papers' code computes (materialised Gram for SFRIK, all matrix powers in
  m-space for MEC, features recomputed per term for HSIC): the benchmark baseline;
* ``"eager-compiled"`` -- ``torch.compile`` of the papers' form: the strongest free peer (one line
  for a user), on every device;
* ``"compile"`` -- ``torch.compile`` of the torch path (only when asked for: it compiles);
* ``"triton"`` -- the fused kernel, once the op's kernel has landed and runs on the inputs' device.

``python -m kernelssl.bench`` adds (:func:`implementations` builds them when named):

* ``"kernelssl"`` -- the library's default call (``backend="auto"``: Triton on CUDA, torch on CPU);
* ``"kernelssl-compiled"`` -- ``torch.compile`` of that call;
* ``"triton-ieee"``, ``"triton-tf32x3"``, ``"triton-tf32"`` -- the kernel at one ``input_precision``
  (:func:`precision_op`);
* ``"limit"`` -- not the loss: the op's essential matrix products alone (:func:`limit_products`).

``make_inputs(loss, shape, ...)`` draws random inputs of a named shape.  HSIC's random features are
drawn once per case (from ``seed``) so that every implementation sees the same maps.

Besides the three papers' losses, ``"uniformity"`` is Wang & Isola's uniformity of one set of
embeddings (t = 2): ``KF.uniformity(z)`` against their code's
``torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()`` on the L2-normalised rows, whose
``n(n-1)/2`` pdist vector sets its memory (:func:`predicted_oom` says when that cannot fit).

The shapes are defined here once (the section "shapes" below), for ``python -m kernelssl.bench``,
``pytest benchmarks``, the performance model and the scripts in ``benchmarks/``; the recorded results
in ``benchmarks/results/`` are at these shapes (docs/benchmarks.md).
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .. import dispatch
from .. import functional as KF
from ..losses import LOSSES
from ..ops import gaussian_gram as _unif
from ..ops import rff_hsic as _hsic
from ..ops import sfrik_loss as _sfrik
from ..ops import taylor_logdet as _mec
from ..ops.legendre_gram import gram_by_halves
from ..ops.rff_hsic import sample_imq_rff
from .measure import MODES, free_gpu_memory, sync

#: The op each loss runs on.
OPS = {"hsic": "rff_hsic", "sfrik": "legendre_gram", "mec": "taylor_logdet", "uniformity": "gaussian_gram"}

# --------------------------------------------------------------------------------------------------
# shapes (the dicts are shared: copy one, {**shape, key: value}, never change it in place)

#: The papers' headline shapes: SSL-HSIC K = 4 views of B = 4096 images (N = 16384), d = 256, D = 512
#: random features per map; SFRIK n = 2048 per view, q = 8192; MEC m = 1024, d = 2048; Wang & Isola's
#: uniformity n = 4096 per view, q = 128 (their feature dimension).
PAPER_SHAPES = {
    "hsic": {"K": 4, "B": 4096, "d": 256, "D": 512},
    "sfrik": {"n": 2048, "q": 8192},
    "mec": {"m": 1024, "d": 2048},
    "uniformity": {"n": 4096, "q": 128},
}
#: The papers' hyper-parameters that the op-level benchmarks and the performance model pass beside the
#: shapes: SFRIK's Legendre coefficients b (L = 3; the library's default), MEC's Taylor order, Wang &
#: Isola's t (their default).
SFRIK_COEFFICIENTS = (1.0, 40.0, 40.0)
MEC_ORDER = 4
UNIFORMITY_T = 2.0

#: The dimension a batch-size sweep varies, per loss.
BATCH_KEY = {"hsic": "B", "sfrik": "n", "mec": "m", "uniformity": "n"}
#: ``python -m kernelssl.bench``'s target shape per device kind and loss.  GPU: the papers' shapes
#: (uniformity at n = 16384).  CPU: smaller ones -- also ``pytest benchmarks --bench-scale full``'s.
TARGET_SHAPES = {
    "cuda": {**PAPER_SHAPES, "uniformity": {**PAPER_SHAPES["uniformity"], "n": 16384}},
    "cpu": {
        "hsic": {"K": 4, "B": 1024, "d": 128, "D": 512},
        "sfrik": {"n": 2048, "q": 256},
        "mec": {"m": 1024, "d": 256},
        "uniformity": PAPER_SHAPES["uniformity"],
    },
}
#: ``python -m kernelssl.bench``'s batch-size sweeps (of :data:`BATCH_KEY`'s dimension of the target
#: shape), ``(full, --quick)`` per device kind and loss.  The uniformity's full sweeps are also ``pytest
#: benchmarks``' sweeps over n (``test_gaussian_gram_sweep.py``); on a GPU they run the pdist form into
#: its out-of-memory point.
BATCH_SWEEPS = {
    "cuda": {
        "hsic": ([512, 1024, 2048, 4096, 8192], [1024, 4096]),
        "sfrik": ([512, 1024, 2048, 4096, 8192, 16384], [1024, 2048, 4096]),
        "mec": ([256, 512, 1024, 2048, 4096], [512, 1024]),
        "uniformity": ([1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072], [4096, 16384]),
    },
    "cpu": {
        "hsic": ([256, 512, 1024], [128, 512]),
        "sfrik": ([512, 1024, 2048], [256, 1024]),
        "mec": ([256, 512, 1024], [128, 512]),
        "uniformity": ([1024, 2048, 4096, 8192, 16384], [512, 1024]),
    },
}
#: ``python -m kernelssl.bench``'s small correctness case: the target shape with a small, odd batch
#: (masks and tails).
CHECK_BATCH = {"hsic": 37, "sfrik": 67, "mec": 45, "uniformity": 61}
#: Its hidden ``--smoke`` mode (the test suite's: seconds, not minutes): ``(target, batches)`` and
#: the correctness case's batch.
SMOKE_SHAPES = {
    "hsic": ({"K": 2, "B": 32, "d": 16, "D": 32}, [16, 32]),
    "sfrik": ({"n": 48, "q": 16}, [24, 48]),
    "mec": ({"m": 24, "d": 16}, [12, 24]),
    "uniformity": ({"n": 48, "q": 16}, [24, 48]),
}
SMOKE_CHECK_BATCH = {"hsic": 9, "sfrik": 11, "mec": 10, "uniformity": 11}

#: ``pytest benchmarks --bench-scale smoke`` (CI's; the default on a CPU): small shapes, so that the
#: benchmarks never rot -- per loss, and for the op sweeps of SFRIK, MEC and the uniformity.
SUITE_SMOKE_SHAPES = {
    "hsic": {"K": 2, "B": 256, "d": 64, "D": 256},
    "sfrik": {"n": 256, "q": 64},
    "mec": {"m": 256, "d": 64},
    "uniformity": {"n": 256, "q": 32},
}
#: The op sweeps of ``pytest benchmarks`` on a GPU (``benchmarks/test_<op>_sweep.py``), around the
#: papers' shapes: ``{op: {dimension: sizes}}``.  The performance model prices some of their points.
OP_SWEEPS = {
    "rff_hsic": {"N": [1024, 4096, 16384, 65536], "D": [128, 256, 512, 1024, 2048]},  # N = K B, K = 4
    "legendre_gram": {"q": [8192, 16384, 32768], "n": [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]},
    "taylor_logdet": {"m": [256, 512, 1024, 2048, 4096, 8192], "d": [128, 256, 512, 1024, 2048, 4096, 8192],
                      "n": [2, 3, 4, 5, 6, 7, 8]},  # n: the Taylor order
    "gaussian_gram": {"n": BATCH_SWEEPS["cuda"]["uniformity"][0]},
}


#: The CPU sweep (``benchmarks/cpu_peer.py --sweep``, ``pytest benchmarks --bench-scale full`` on a CPU):
#: the default call against ``torch.compile`` of the papers' form from small batches up, per loss.  SFRIK's
#: n x q grid crosses both of the torch tier's size crossovers (one Gram block up to n = 256, the degree-2
#: term in q x q space from n = 16 q: :mod:`kernelssl.ops.legendre_gram`).
CPU_SWEEP = {
    "sfrik": [{"n": n, "q": q} for n in (256, 512, 1024, 2048, 4096, 16384) for q in (128, 256, 512)],
    "hsic": [{"K": K, "B": B, "d": d, "D": 512} for K in (2, 4) for B in (256, 1024) for d in (128, 256)],
    "mec": [{"m": m, "d": d} for m in (256, 1024, 2048) for d in (128, 512)],
}
#: ``pytest benchmarks --bench-scale smoke``'s SFRIK shapes on each side of those crossovers, small enough for CI:
#: one block, blocks with the degree-2 term in the blocks, blocks with it in q x q space.
SFRIK_CROSSOVER_SMOKE = [{"n": 256, "q": 128}, {"n": 264, "q": 128}, {"n": 264, "q": 16}]


def mec_lambda(m: int, d: int) -> float:
    """``d / (64 m)``: the MEC op's lambda in the op benchmarks and the performance model."""
    return d / (64.0 * m)


def hsic_features(shape: dict) -> int:
    """D, the random features per map of an HSIC shape (the papers' 512 where the shape has none)."""
    return shape.get("D", PAPER_SHAPES["hsic"]["D"])


def make_inputs(
    loss: str, shape: dict, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Leaf input tensors (requires_grad where the loss differentiates them).

    shape keys -- hsic: K, B, d (and D, used by :func:`implementations`); sfrik and uniformity: n, q;
    mec: m, d.  MEC gets online outputs (with grad) and teacher outputs (without), like a training step;
    uniformity one raw ``(n, q)`` set of embeddings (normalised inside every implementation).
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*s, grad=True):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)

    if loss == "hsic":
        return (randn(shape["K"], shape["B"], shape["d"]),)
    if loss == "sfrik":
        return randn(shape["n"], shape["q"]), randn(shape["n"], shape["q"])
    if loss == "mec":
        m, d = shape["m"], shape["d"]
        return randn(m, d), randn(m, d), randn(m, d, grad=False), randn(m, d, grad=False)
    if loss == "uniformity":
        return (randn(shape["n"], shape["q"]),)
    raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")


PRECISIONS = ("ieee", "tf32x3", "tf32")


def available(loss: str, device: str | torch.device, *, compile: bool = False) -> tuple[str, ...]:
    """Names of the implementations of ``loss`` that ``pytest benchmarks/`` runs on ``device``: always
    the papers' form eager and under ``torch.compile`` (the strongest free peer) and the torch path;
    ``compile`` adds ``torch.compile`` of the torch path; CUDA adds the fused kernel."""
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    names = ["eager", "eager-compiled", "torch"]
    if compile:
        names.append("compile")
    if OPS[loss] in dispatch.TRITON_OPS and torch.device(device).type == "cuda":
        names.append("triton")
    return tuple(names)


def case_id(shape: dict, dtype: torch.dtype) -> str:
    """``"K4-B4096-d256-D512-float32"``: a shape and dtype in a ``pytest benchmarks`` test id."""
    return "-".join(f"{k}{v}" for k, v in shape.items()) + f"-{str(dtype)[6:]}"


def sweep_params(loss: str, op: str, cases, *, device: str | torch.device | None = None, variant: str | None = None,
                 variant_shape: dict | None = None) -> dict:
    """``metafunc.parametrize`` keywords (``argvalues``, ``ids``) of an op sweep of ``pytest benchmarks``:
    ``(shape, dtype, mode, impl)`` for every ``(shape, dtype, mode)`` of ``cases`` and every
    implementation of ``loss`` that runs on ``device`` (default: CUDA if available; :func:`available`,
    with ``torch.compile`` of the torch path on a GPU).  Where the Triton kernel runs, the fp32 cases
    at ``variant_shape`` in the :data:`~kernelssl.bench.measure.MODES` also get the implementation
    ``variant`` (e.g. ``"triton-tf32x3"``: the kernel with its TF32 opt-in, timed beside the default,
    so one GPU run tells whether the opt-in pays).
    Ids: ``<op>-<mode>-<shape>-<dtype>-<impl>``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    params, ids = [], []
    for shape, dtype, mode in cases:
        impls = available(loss, device, compile=device.type == "cuda")
        if variant and "triton" in impls and (shape, dtype) == (variant_shape, torch.float32) and mode in MODES:
            impls += (variant,)
        for impl in impls:
            params.append((shape, dtype, mode, impl))
            ids.append(f"{op}-{mode}-{case_id(shape, dtype)}-{impl}")
    return {"argvalues": params, "ids": ids}


def hsic_maps(shape: dict, *, device: str | torch.device = "cpu", seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(w_a, b_a, w_b, b_b)``: the two RFF maps (d = ``shape["d"]``, D = :func:`hsic_features`) that
    every HSIC implementation of :func:`implementations` uses for ``seed``."""
    d, D = shape["d"], hsic_features(shape)
    g = torch.Generator().manual_seed(seed)
    w_a, b_a = sample_imq_rff(d, D, generator=g, device=device)
    w_b, b_b = sample_imq_rff(d, D, generator=g, device=device)
    return w_a, b_a, w_b, b_b


def implementations(
    loss: str,
    shape: dict,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    compile: bool = False,
    names: tuple[str, ...] | None = None,
    compile_kwargs: dict | None = None,
) -> dict[str, Callable[..., torch.Tensor]]:
    """``{name: fn(*inputs) -> scalar loss}`` for :func:`available` implementations, or for ``names``
    (any of the names in the module docstring; ``torch.compile(fn, **compile_kwargs)`` wraps only the
    compiled ones named, and compiles on their first call).  For HSIC, ``shape`` fixes d and D (the
    random maps); the functions take any batch size."""
    device = torch.device(device)
    names = available(loss, device, compile=compile) if names is None else tuple(names)
    if loss == "hsic":
        w_a, b_a, w_b, b_b = hsic_maps(shape, device=device, seed=seed)

        def run(fn):
            return lambda views: _hsic.hsic_loss(*fn(views, w_a, b_a, w_b, b_b, 1.0), gamma=3.0)

        impls = {
            "eager": run(_hsic.rff_hsic_eager),
            "torch": run(lambda *a: KF.rff_hsic(*a, backend="torch")),
            "triton": run(lambda *a: KF.rff_hsic(*a, backend="triton")),
            "kernelssl": run(KF.rff_hsic),
        }
    elif loss == "sfrik":
        impls = {
            "eager": lambda za, zb: _sfrik.sfrik_loss(za, zb, eager=True)[0],
            "torch": lambda za, zb: KF.sfrik_loss(za, zb, backend="torch"),
            "triton": lambda za, zb: KF.sfrik_loss(za, zb, backend="triton"),
            "kernelssl": lambda za, zb: KF.sfrik_loss(za, zb),
        }
    elif loss == "uniformity":
        impls = {
            "eager": uniformity_eager,
            "torch": lambda z: KF.uniformity(z, UNIFORMITY_T, backend="torch"),
            "triton": lambda z: KF.uniformity(z, UNIFORMITY_T, backend="triton"),
            "kernelssl": lambda z: KF.uniformity(z, UNIFORMITY_T),
        }
    else:
        impls = {
            "eager": lambda za, zb, pa, pb: _mec.mec_loss(za, zb, pa, pb, eager=True)[0],
            "torch": lambda za, zb, pa, pb: KF.mec_loss(za, zb, pa, pb, backend="torch"),
            "triton": lambda za, zb, pa, pb: KF.mec_loss(za, zb, pa, pb, backend="triton"),
            "kernelssl": lambda za, zb, pa, pb: KF.mec_loss(za, zb, pa, pb),
        }
    compiled = {"eager-compiled": "eager", "compile": "torch", "kernelssl-compiled": "kernelssl"}
    out = {}
    for name in names:
        if name in impls:
            out[name] = impls[name]
        elif name in compiled:
            out[name] = torch.compile(impls[compiled[name]], **(compile_kwargs or {}))
        elif name.startswith("triton-") and name[len("triton-"):] in PRECISIONS:
            out[name] = precision_loss(loss, name[len("triton-"):], shape, device=device, seed=seed)
        elif name == "limit":
            out[name] = limit_products(loss, shape)
        else:
            raise ValueError(f"names: unknown implementation {name!r} of {loss}")
    return out


def uniformity_eager(z: torch.Tensor, t: float = UNIFORMITY_T) -> torch.Tensor:
    """Wang & Isola's uniformity as their code computes it (``uniform_loss``), on the L2-normalised rows:
    the ``n(n-1)/2`` vector of pairwise distances, materialised.  16-bit inputs are upcast to fp32
    first, as ``torch.autocast`` does for ``pdist`` (it is on autocast's fp32 list)."""
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    return _unif.uniformity_pdist(torch.nn.functional.normalize(z, dim=-1), t)


#: Peak extra memory of the pdist form in units of its ``n(n-1)/2`` distance vector.  Forward+backward
#: (``True``): pdist's output, the saved ``pow``/``exp`` results and their gradients -- measured on the
#: CPU (fp32, q = 128, peak RSS above the pre-call RSS) 8.2x at n = 1024, 7.1x at 2048, 7.4x at 4096,
#: 5.0x at 8192 and 16384: 8 is taken.  Forward under ``torch.no_grad()`` (``False``): two vectors
#: alive at a time, measured 2.1x at n = 4096, 2.0x at 16384 and 32768: 3 is taken.  A prediction
#: errs towards skipping.
PDIST_PEAK_VECTORS = {True: 8, False: 3}
#: Share of the memory available at the start of a case (``MemAvailable``) that a predicted peak may
#: take on the CPU: a host out-of-memory kills the process (Linux's OOM killer) instead of raising,
#: and the machine may be shared.
CPU_MEMORY_SHARE = 1 / 3


def pdist_vector_bytes(n: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the ``n(n-1)/2`` distances that ``torch.pdist`` materialises (16-bit inputs: fp32)."""
    size = torch.finfo(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype).bits // 8
    return n * (n - 1) // 2 * size


def memory_cap_bytes(device: str | torch.device) -> int | None:
    """The most a benchmark case may be predicted to need on ``device``: on the CPU
    :data:`CPU_MEMORY_SHARE` of ``MemAvailable`` (``/proc/meminfo``; None where unreadable); on a GPU
    None -- the caching allocator raises ``OutOfMemoryError``, which the benchmarks catch and record."""
    if torch.device(device).type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * CPU_MEMORY_SHARE)
    except OSError:
        pass
    return None


def predicted_oom(loss: str, name: str, shape: dict, *, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", cap: int | None = None, grad: bool = True) -> str | None:
    """Why ``name`` of ``loss`` is not run at ``shape`` (its predicted peak exceeds ``cap``, default
    :func:`memory_cap_bytes`), or None.  Only the pdist forms of uniformity (``eager``,
    ``eager-compiled``) are predicted: ``PDIST_PEAK_VECTORS[grad]`` times the pdist vector (``grad``:
    forward+backward; else a forward under ``torch.no_grad()``)."""
    if loss != "uniformity" or name not in ("eager", "eager-compiled"):
        return None
    cap = memory_cap_bytes(device) if cap is None else cap
    if cap is None:
        return None
    vec = pdist_vector_bytes(shape["n"], dtype)
    factor = PDIST_PEAK_VECTORS[bool(grad)]
    need = factor * vec
    if need <= cap:
        return None
    return (f"predicted OOM ({_size(need)}: {factor} x the pdist vector of {_size(vec)}, above "
            f"the cap of {_size(cap)} = {CPU_MEMORY_SHARE:.2g} of the available memory); not run")


def _size(b: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if b >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{b / 2**10:.0f} KiB"


def default_backend(loss: str, device: str | torch.device) -> str:
    """What ``backend="auto"`` (the library's default call) runs for fp32 ``loss`` inputs on ``device``."""
    impl = dispatch.implementation(OPS[loss], "auto", torch.empty(0, device=device))
    return "triton" if impl == "triton" else "torch"


def is_compiled(name: str) -> bool:
    return name in ("eager-compiled", "compile", "kernelssl-compiled")


# --------------------------------------------------------------------------------------------------
# the kernel at one input precision


def precision_op(loss: str, precision: str) -> Callable[..., object]:
    """The loss's core op with the fused kernel at ``input_precision=precision`` (one of
    :data:`PRECISIONS`), called like the functional op minus ``backend``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if loss == "uniformity":
        return lambda z, **k: KF.uniformity(z, UNIFORMITY_T, backend="triton", input_precision=precision, **k)
    fn = getattr(KF, {"sfrik": "legendre_gram_mean"}.get(loss, OPS[loss]))
    return lambda *a, **k: fn(*a, backend="triton", input_precision=precision, **k)


def precision_loss(loss: str, precision: str, shape: dict, *, device="cpu", seed: int = 0):
    """``fn(*inputs) -> loss`` through :func:`precision_op`."""
    op = precision_op(loss, precision)
    if loss == "hsic":
        maps = hsic_maps(shape, device=device, seed=seed)
        return lambda views: _hsic.hsic_loss(*op(views, *maps, 1.0), gamma=3.0)
    if loss == "sfrik":
        return lambda za, zb: _sfrik.sfrik_loss(za, zb, gram_mean=lambda z, b: op(z, b, normalize=True))[0]
    if loss == "uniformity":
        return op
    return lambda za, zb, pa, pb: _mec.mec_loss(za, zb, pa, pb, logdet=lambda a, b, lam, n: op(a, b, lam, n))[0]


# --------------------------------------------------------------------------------------------------
# the limit: the op's essential matrix products alone


class FastestOf:
    """``fn(*inputs)`` that runs the fastest of several implementations of the same products: on the first
    call with inputs of a new shape and dtype each candidate is timed on them (one warm-up call -- a
    compiled candidate compiles there --, then the best of :data:`LIMIT_TRIALS` calls, interleaved) and
    every call with such inputs runs the winner.  :attr:`chosen` names the last winner, :attr:`trial_ms`
    holds each candidate's best time there.  A candidate that raises (a compile failure, an out of memory)
    drops out; if all do, the last error propagates."""

    def __init__(self, candidates: dict[str, Callable[..., object]]):
        self.candidates = candidates
        self.chosen: str | None = None
        self.trial_ms: dict[str, float] = {}
        self._by_key: dict[tuple, str] = {}

    def __call__(self, *inputs):
        key = tuple((tuple(x.shape), x.dtype, x.device) for x in inputs if isinstance(x, torch.Tensor))
        if key not in self._by_key:
            self._by_key[key] = self._choose(inputs)
        self.chosen = self._by_key[key]
        return self.candidates[self.chosen](*inputs)

    def _choose(self, inputs) -> str:
        device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
        live, error = {}, None
        for name, fn in self.candidates.items():
            try:
                fn(*inputs)
                live[name] = fn
            except (RuntimeError, MemoryError) as exc:  # compile failures and OOMs are RuntimeErrors
                error = exc
        if not live:
            free_gpu_memory()
            raise error  # type: ignore[misc]
        best = {name: float("inf") for name in live}
        for _ in range(LIMIT_TRIALS):
            for name, fn in live.items():
                sync(device)
                t0 = time.perf_counter()
                fn(*inputs)
                sync(device)
                best[name] = min(best[name], time.perf_counter() - t0)
        self.trial_ms = {name: t * 1e3 for name, t in best.items()}
        return min(best, key=best.get)  # type: ignore[arg-type]


#: Timed calls per candidate when :class:`FastestOf` chooses the limit's implementation.
LIMIT_TRIALS = 3
#: Block edges of the symmetric Gram products of the limit (:func:`symmetric_gram_products`), one candidate
#: each: 256 is SFRIK's own block (``kernelssl.ops.legendre_gram.SFRIK_BLOCK_ROWS``), faster than 512 at
#: n = 16384 on 2 threads.
LIMIT_BLOCKS = (256, 512)


def symmetric_gram_products(z: torch.Tensor, block: int) -> torch.Tensor:
    """``G = Z Z^T`` over its upper triangle of ``(block, block)`` blocks and ``R = G' Z`` for a dense
    symmetric ``G'`` (G itself stands in for it): ``R_I += G_IJ Z_J``, ``R_J += G_IJ^T Z_I``.  Half the
    Gram GEMM of the full products, all of the gradient's; returns R.  ``z`` is ``(n, q)`` or ``(V, n, q)``:
    V sets batched through every product (``bmm``), as the library batches SFRIK's two views; the blocks
    reuse one buffer, and each row block of R is written first with ``beta = 0`` (no zero fill), as the
    library's are."""
    zz = z if z.dim() == 3 else z.unsqueeze(0)
    V, n, _ = zz.shape
    r = torch.empty_like(zz)
    written = set()  # row blocks of R written once already
    buf = zz.new_empty(V * block * block)  # one block buffer for all blocks: no fresh pages per block
    for i in range(0, n, block):
        zi = zz[:, i : i + block]
        for j in range(i, n, block):
            zj = zz[:, j : j + block]
            g = torch.bmm(zi, zj.mT, out=buf[: V * zi.shape[1] * zj.shape[1]].view(V, zi.shape[1], zj.shape[1]))
            for rows, gg, zz_ in ((i, g, zj),) + (((j, g.mT, zi),) if j != i else ()):
                r[:, rows : rows + block].baddbmm_(gg, zz_, beta=float(rows in written))
                written.add(rows)
    return r if z.dim() == 3 else r[0]


#: Largest n for which the limit also tries the Gram by halves (:func:`halves_gram_products`).
LIMIT_HALVES_MAX_ROWS = 512


def halves_gram_products(z: torch.Tensor) -> torch.Tensor:
    """``R = G Z`` with ``G = Z Z^T`` formed by halves, as SFRIK's one-block pass does where
    :func:`kernelssl.ops.legendre_gram.split_gram` says so: the lower half by two GEMMs (3/4 of the Gram's
    products), the upper half its mirror.  ``z`` is ``(V, n, q)``; returns R."""
    V, n, _ = z.shape
    return torch.bmm(gram_by_halves(z, z.new_empty(V, n, n)), z)


def limit_products(loss: str, shape: dict) -> Callable[..., torch.Tensor]:
    """``fn(*inputs)``: the matrix products the loss's forward+backward cannot avoid, on the same
    inputs in their dtype, without autograd -- the time a fused implementation would approach if
    everything else were free.  (Not a loss: ``fn`` returns the products, every one, so that no compiled
    candidate can drop one as dead code.)  A :class:`FastestOf`
    the products through aten (``"aten"``), under ``torch.compile`` (``"compiled"``) and, where the
    Gram matrix is symmetric (SFRIK, uniformity), over its upper triangle (``"symmetric-256"`` and
    ``"symmetric-512"``, blocks of :data:`LIMIT_BLOCKS`, :func:`symmetric_gram_products`; up to
    n = :data:`LIMIT_HALVES_MAX_ROWS` also by halves, ``"halves"``, :func:`halves_gram_products`): the
    fastest way this device does them, so that the row is a lower bound.  The bench reports any row
    faster than its limit as a fault of the limit.

    * hsic: the two projections ``X W_A^T``, ``X W_B^T`` (N x d x D each), the cross-covariance
      ``Phi_B^T Phi_A`` (D x N x D); backward ``Phi_B C``, ``Phi_A C^T`` (N x D x D) and
      ``dU_A W_A + dU_B W_B`` (N x D x d, two).
    * sfrik: per view, ``G = Z Z^T`` (n x q x n; symmetric: half of it is needed) and the backward
      ``G' Z`` (n x n x q).
    * mec (order 4, both directions; in min(m, d) space like the library, s = min(m, d)):
      ``C = A B^T`` (s x max x s), ``C^2`` (one s^3, the forward's only power), ``C^3`` (the
      backward's series), and the gradient products ``S^T B``, ``S A`` (s x s x max) of the inputs that
      require grad (the online outputs; the teacher's have none in a training step).
    * uniformity: ``G = Z Z^T`` (n x q x n; symmetric) and the backward ``G' Z`` (n x n x q), one set of
      embeddings.
    """
    if loss == "hsic":
        maps: dict = {}

        def hsic_limit(products):
            def fn(views):
                K, B, d = views.shape
                x = views.detach().reshape(K * B, d)
                key = (x.dtype, x.device)
                if key not in maps:  # the maps, made once (their values do not matter to the time)
                    D = hsic_features(shape)
                    maps[key] = tuple(torch.rand(D, d, device=x.device).to(x.dtype) for _ in range(2))
                return products(x, *maps[key])

            return fn

        return FastestOf({"aten": torch.no_grad()(hsic_limit(_hsic_products)),
                          "compiled": torch.no_grad()(hsic_limit(torch.compile(_hsic_products, dynamic=False)))})
    if loss in ("sfrik", "uniformity"):
        # every product is returned: a compiled candidate must not drop one as dead code
        def gram_products(*views):
            return tuple((z @ z.T) @ z for z in (v.detach() for v in views))

        def symmetric(block):  # the views batched, as the library does
            return lambda *views: symmetric_gram_products(torch.stack([v.detach() for v in views]), block).unbind(0)

        aten = gram_products
    else:
        def mec_limit(za, zb, pa, pb):
            out = []
            for a, b in ((pa, zb), (pb, za)):  # both directions
                need_a, need_b = a.requires_grad, b.requires_grad
                a, b = a.detach(), b.detach()
                if a.shape[-2] > a.shape[-1]:  # d-space, as the library evaluates it
                    a, b = a.mT, b.mT
                c = a @ b.mT
                c2 = c @ c  # the forward's power
                c3 = c2 @ c  # the backward's series
                out.append(c2)  # and the gradient products of the inputs that need one (all returned: no dead code)
                out += ([c3.mT @ b] if need_a else []) + ([c3 @ a] if need_b else [])
            return tuple(out)

        aten = mec_limit
    candidates = {"aten": aten, "compiled": torch.compile(aten, dynamic=False)}
    if loss in ("sfrik", "uniformity"):
        candidates.update({f"symmetric-{t}": symmetric(t) for t in LIMIT_BLOCKS})
        if shape["n"] <= LIMIT_HALVES_MAX_ROWS:
            candidates["halves"] = lambda *vs: halves_gram_products(torch.stack([v.detach() for v in vs])).unbind(0)
    return FastestOf({name: torch.no_grad()(fn) for name, fn in candidates.items()})


def _hsic_products(x: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    pa, pb = x @ w_a.T, x @ w_b.T
    c = pb.T @ pa
    ga, gb = pb @ c, pa @ c.T
    return ga @ w_a + gb @ w_b


def forward_backward(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One training-style step of the loss alone: forward, backward, gradients cleared first."""
    for x in inputs:
        x.grad = None
    loss = fn(*inputs)
    loss.backward()
    return loss.detach()
