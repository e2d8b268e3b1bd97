"""Drop-in ``nn.Module`` losses: :class:`HSICLoss`, :class:`SFRIKLoss`, :class:`MECLoss` (SPEC §5), and
Wang & Isola's :class:`UniformityLoss` and :class:`AlignUniformLoss` (SPEC §6.1).

Each is a thin module over :mod:`kernelssl.functional`: keyword-only hyper-parameters with the
papers' defaults, ``backend="auto" | "triton" | "torch"``, and ``check_finite=True`` to raise on
NaN/Inf inputs (by default they propagate to a NaN loss -- never a silent finite number).
``forward`` always returns the scalar loss tensor (so ``loss.backward()`` always works);
``forward_components(...)`` takes the same arguments and returns, from the same single pass, a small
dataclass of the terms to log that holds the loss too (lightly's idiom).  The former
``return_components=True`` constructor flag, which changed ``forward``'s return type, is removed:
passing it raises a ``TypeError`` that says what to call instead.

Decisions (where lightly, solo-learn and the papers differ):

* Hyper-parameters are keyword-only (``HSICLoss(gamma=1.0)``, never ``HSICLoss(1.0)``): three losses
  with many float parameters are too easy to call with the numbers in the wrong order.  lightly's
  newer losses do the same.
* Every flag is strictly a ``bool`` and every number is checked when the module is built (a string
  where a bool belongs raises a ``TypeError``: ``normalize="no"`` would otherwise switch it on).
* All three normalise the rows themselves (``HSICLoss(normalize=True)`` by default, SFRIK and MEC
  always), so they take raw projector outputs like lightly's NT-Xent does.

``gather_distributed=True`` computes every term on the global batch gathered from all data-parallel
ranks (:mod:`kernelssl.distributed`): every rank returns the loss of one process holding the global
batch, and after DistributedDataParallel averages the gradients the parameter gradients equal that
process's.  Uneven local batches are handled (padded for the collective, padding dropped).  Costs one
small metadata all-gather with a host read (one sync per call), one all-gather of the embeddings, and
a reduce-scatter in the backward.  Without an initialised process group (or with one rank) it is a
no-op.  Hyper-parameters that depend on the batch size refer to the **global** batch (MEC's m).

Autocast (mixed precision).  The losses run in float32 whatever autocast says: inside
``torch.autocast(device, dtype=torch.bfloat16 | torch.float16)`` they switch autocast off for the
inputs' device, upcast fp16/bf16 embeddings to float32, compute and accumulate in float32 and return
a float32 scalar; gradients flow back in the embeddings' dtype.  So a model with fp32 weights and
bf16 activations can call the loss inside its autocast region and gets the same loss as calling it
outside on the same (bf16) embeddings -- no matmul of the loss silently drops to bf16/fp16 (their
8/11-bit mantissas would cost the kernel sums 2-3 digits).  float64 inputs compute in float64.

``torch.compile``: the three modules trace with ``fullgraph=True`` (no graph break) when
``gather_distributed=False``, except that :class:`HSICLoss` draws its random features from a
``torch.Generator``, which dynamo cannot trace: draw them outside the compiled region with
:meth:`HSICLoss.draw_features` and pass them as ``forward(..., features=...)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from . import functional as KF
from . import hsic as _hsic
from ._backend import BACKENDS
from . import uniformity as _unif
from ._backend import resolve_precision
from ._checks import check_bool, check_choice, check_coefficients, check_int, check_positive

__all__ = ["HSICLoss", "SFRIKLoss", "MECLoss", "UniformityLoss", "AlignUniformLoss"]

Tensor = torch.Tensor


def _check_common(gather_distributed: bool, backend: str, check_finite: bool) -> None:
    check_choice(backend, "backend", BACKENDS)
    check_bool(gather_distributed, "gather_distributed")
    check_bool(check_finite, "check_finite")


def _reject_return_components(value: object) -> None:
    if value is not None:
        raise TypeError(
            "return_components: removed -- forward() always returns the scalar loss tensor; call "
            "criterion.forward_components(...) with the same arguments for the terms to log (a dataclass "
            "that holds the loss too)"
        )


def _hsic_views(views: tuple, view_dim: int | None) -> Tensor:
    """``HSICLoss``'s views -> ``(K, B, d)``: K >= 2 tensors ``(B, d)``, one list/tuple of them, or one
    stacked 3-D tensor whose view axis is named by ``view_dim`` (0: ``(K, B, d)``, 1: ``(B, K, d)``)."""
    if len(views) == 1 and isinstance(views[0], (list, tuple)):
        views = tuple(views[0])
    if len(views) == 1 and isinstance(views[0], Tensor) and views[0].dim() == 3:
        stacked = views[0]
        if view_dim is None:
            raise ValueError(
                f"views: got one 3-D tensor of shape {tuple(stacked.shape)} and no view_dim; a stacked tensor is "
                "never guessed (a (B, K, d) tensor read as (K, B, d) is a silently wrong loss): pass "
                "view_dim=0 for (K, B, d) (torch.stack(views)) or view_dim=1 for (B, K, d) "
                "(torch.stack(views, dim=1)), or pass the views as separate (B, d) tensors or one list"
            )
        if isinstance(view_dim, bool) or view_dim not in (0, 1):
            raise ValueError(f"view_dim: expected 0 ((K, B, d)) or 1 ((B, K, d)), got {view_dim!r}")
        return KF._as_views(stacked if view_dim == 0 else stacked.transpose(0, 1))
    if view_dim is not None:
        raise ValueError(
            f"view_dim: expected None unless the views come as one stacked 3-D tensor, got view_dim={view_dim!r} "
            f"with {len(views)} argument(s)"
        )
    return KF._as_views(views)


class HSICLoss(nn.Module):
    """SSL-HSIC (Li, Pogodin, Sutherland, Gretton -- NeurIPS 2021), linear in the batch size.

    ::

        loss = gamma * sqrt(HSIC(Z, Z)) - HSIC(Z, Y)

    ``HSIC(Z, Y)`` is the dependence between embeddings and image identity (row index), ``HSIC(Z, Z)``
    the redundancy penalty, both with the inverse multiquadric kernel
    ``k_c(x, y) = c / sqrt(||x - y||^2 + c^2)`` approximated by ``num_features`` random Fourier
    features, two independent maps redrawn at every call (SPEC §1).  Cost O(N d D + N D^2), memory
    O(N D + D^2) for N = B*K embeddings: never an N x N matrix.

    Args (keyword-only):
        num_features: D, the number of random Fourier features per map (paper: 512).
        gamma: weight of ``sqrt(HSIC(Z, Z))`` (paper: 3).
        kernel_scale: the IMQ scale c (paper: learned from 1.0).
        learn_scale: own c as a parameter and learn it with the paper's side objective
            ``-log(c/2) + 1.5 mean log(rho + c^2)`` (rho = squared distances of ``num_scale_pairs``
            sampled pairs, no gradient to the embeddings).  The module then returns
            ``hsic_loss + scale_objective``: the embeddings get gradients from the first term only
            (c is stop-gradient there), c from the second only.  Give ``loss.parameters()`` its own
            optimiser (the paper: Adam, lr 3e-4).  The learned c is never read on the host: should
            an optimiser drive it to <= 0, the loss becomes NaN (not a silent number).
        kernel: ``"rff"`` (the paper's estimator) or ``"exact"`` (the exact kernel, O(N^2) memory;
            for checking).
        normalize: L2-normalise each embedding first (default True, as the paper's code does before
            the loss).  The loss is not scale-invariant without it: on raw projector outputs
            (||z|| ~ 10) the IMQ kernel with c = 1 sees nearly orthogonal far-apart points and the
            default loss did not learn (issue 14).  ``False`` takes the rows as given (for rows you
            normalised yourself; the functional ``ssl_hsic_loss`` never normalises).
        num_scale_pairs: pairs sampled per step for the scale objective (``learn_scale``).
        seed: seed of the module's own generators for the random features (an int in
            [0, 2^64 - 1]), used when ``forward`` gets no ``generator``; the same seed gives the same
            features on every rank.  The generators' states are part of ``state_dict()``
            (``_extra_state``): a module restored from a checkpoint draws the features the saved one
            would have drawn next.
        gather_distributed: compute the loss on the views gathered from all ranks (B = global batch,
            N = K B).  The random features must be identical on every rank: the module's own
            generator is (same seed, same number of calls on every rank); a ``generator=`` passed to
            ``forward`` must be seeded alike on every rank (never by rank).  Its state is
            checksummed and compared across ranks in the gather's metadata exchange: a difference
            raises a ``ValueError`` (no seed is broadcast: that would cost a collective per step).
        backend, check_finite: see the module docstring.

    Views: ``forward(z1, z2, ...)`` with K >= 2 tensors ``(B, d)`` (row i of each is image i), or one
    list/tuple of them (``forward([z1, z2])``, as lightly's multi-view losses take).  A single stacked
    3-D tensor is accepted only with its view axis named: ``view_dim=0`` for ``(K, B, d)``,
    ``view_dim=1`` for ``(B, K, d)``; without it a ``ValueError`` -- a ``(B, K, d)`` tensor read as
    ``(K, B, d)`` would be a silently wrong loss.

    Example (a two-view training loop; ``backbone``/``projector`` are yours)::

        criterion = HSICLoss()                      # normalize=True: raw projector outputs are fine
        for x1, x2 in loader:                       # two augmentations of the same images
            z1, z2 = projector(backbone(x1)), projector(backbone(x2))
            loss = criterion(z1, z2)
            optimizer.zero_grad(); loss.backward(); optimizer.step()

    With the paper's learned scale::

        criterion = HSICLoss(learn_scale=True)
        scale_opt = torch.optim.Adam(criterion.parameters(), lr=3e-4)
        ...
            loss = criterion(z1, z2)
            optimizer.zero_grad(); scale_opt.zero_grad()
            loss.backward()
            optimizer.step(); scale_opt.step()
    """

    def __init__(
        self,
        *,
        num_features: int = 512,
        gamma: float = 3.0,
        kernel_scale: float = 1.0,
        learn_scale: bool = False,
        kernel: str = "rff",
        normalize: bool = True,
        num_scale_pairs: int = 1024,
        seed: int = 0,
        gather_distributed: bool = False,
        backend: str = "auto",
        check_finite: bool = False,
        return_components: None = None,
    ) -> None:
        super().__init__()
        _reject_return_components(return_components)
        check_int(num_features, "num_features", minimum=1)
        check_positive(gamma, "gamma", allow_zero=True)
        check_positive(kernel_scale, "kernel_scale")
        check_bool(learn_scale, "learn_scale")
        check_choice(kernel, "kernel", ("rff", "exact"))
        check_bool(normalize, "normalize")
        check_int(num_scale_pairs, "num_scale_pairs", minimum=1)
        check_int(seed, "seed", minimum=0, maximum=2**64 - 1)  # what torch.Generator.manual_seed takes
        _check_common(gather_distributed, backend, check_finite)
        self.num_features = num_features
        self.gamma = float(gamma)
        self.learn_scale = learn_scale
        self.kernel = kernel
        self.normalize = normalize
        self.num_scale_pairs = num_scale_pairs
        self.seed = seed
        self.gather_distributed = gather_distributed
        self.backend = backend
        self.check_finite = check_finite
        if learn_scale:
            self.kernel_scale = nn.Parameter(torch.tensor(float(kernel_scale)))
        else:
            self.kernel_scale = float(kernel_scale)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._pending_states: dict[str, Tensor] = {}  # loaded by set_extra_state, applied on first use

    def _generator(self, device: torch.device) -> torch.Generator | None:
        # One generator per device, seeded identically: drawing on the device of the embeddings
        # avoids a host-to-device copy (and its implicit sync) every step.  Meta tensors (shape
        # propagation) draw nothing: None.
        if device.type == "meta":
            return None
        if device not in self._generators:
            gen = torch.Generator(device=device).manual_seed(self.seed)
            state = self._pending_states.pop(str(device), None)
            if state is not None:
                gen.set_state(state)
            self._generators[device] = gen
        return self._generators[device]

    def get_extra_state(self) -> dict:
        """The random-feature stream, for ``state_dict()``: the seed and the state of the generator of
        every device used so far (plus any loaded but not yet used)."""
        gens = dict(self._pending_states)
        gens.update({str(dev): g.get_state() for dev, g in self._generators.items()})
        return {"seed": self.seed, "generators": gens}

    def set_extra_state(self, state: dict) -> None:
        """Restore :meth:`get_extra_state`: each device's generator continues where the saved one was
        (applied when that device is first used, so a CPU checkpoint loads before ``.to(device)``)."""
        if not isinstance(state, dict) or "generators" not in state or "seed" not in state:
            raise ValueError(f"_extra_state: expected a dict with 'seed' and 'generators', got {type(state).__name__}")
        self.seed = check_int(state["seed"], "_extra_state['seed']", minimum=0, maximum=2**64 - 1)
        self._generators = {}
        self._pending_states = {str(k): v for k, v in state["generators"].items()}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint from before the generator state was saved has no _extra_state: load it as it
        # was (generators restart from the seed) instead of failing with a missing key.
        # (load_state_dict passes its own copy of the dict.)
        state_dict.setdefault(prefix + "_extra_state", {"seed": self.seed, "generators": {}})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def draw_features(
        self, dim: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The two maps ``(w_a, b_a, w_b, b_b)`` that ``forward`` would draw next for ``(K, B, dim)``
        views of ``dtype`` on ``device`` -- from the module's generator for that device, in the same
        order and dtype (float64 for float64 views, else float32), advancing it the same way.  Pass
        them as ``forward(..., features=...)``: eager and compiled steps then see the same numbers.
        ``dtype`` is the views' floating dtype (float16, bfloat16, float32 or float64).
        """
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(
                f"dtype: expected the views' floating dtype (torch.float16, torch.bfloat16, torch.float32 or "
                f"torch.float64), got {dtype!r}"
            )
        device = torch.device(device)
        gen = self._generator(device)
        dt = torch.float64 if dtype == torch.float64 else torch.float32
        w_a, b_a = KF.sample_imq_rff(dim, self.num_features, generator=gen, device=device, dtype=dt)
        w_b, b_b = KF.sample_imq_rff(dim, self.num_features, generator=gen, device=device, dtype=dt)
        return w_a, b_a, w_b, b_b

    @KF._fp32_compute
    def _compute(self, views: tuple, view_dim, generator, features) -> KF.HSICComponents:
        stacked = _hsic_views(views, view_dim)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        if features is not None:
            if self.kernel != "rff":
                raise ValueError(
                    f"features: expected None with kernel={self.kernel!r} (maps are for kernel='rff'), got maps"
                )
            if not isinstance(features, (tuple, list)) or len(features) != 4:
                raise TypeError(
                    "features: expected a tuple (w_a, b_a, w_b, b_b) as returned by draw_features, "
                    f"got {type(features).__name__}"
                )
        elif generator is None and self.kernel == "rff":
            generator = self._generator(stacked.device)
        if self.check_finite:  # before normalising (the row scaling would spread a NaN over its row)
            KF._assert_finite([stacked], ["views"])
        if self.normalize:
            stacked = torch.nn.functional.normalize(KF._prescale_rows(stacked), dim=-1)
        if self.gather_distributed:
            # Everything random is drawn after the gather from `generator`: check it agrees on all ranks.
            stacked = KF.gather_views(stacked, generator if generator is not None else False)
        c = self.kernel_scale
        if features is None:
            out = KF.ssl_hsic_loss(
                stacked,
                num_features=self.num_features,
                gamma=self.gamma,
                kernel_scale=c,
                kernel=self.kernel,
                generator=generator,
                backend=self.backend,
                check_finite=self.check_finite,
                return_components=True,
            )
        else:
            zy, zz = KF.rff_hsic(stacked, *features, c, backend=self.backend, check_finite=self.check_finite)
            c_log = c.detach().reshape(()) if isinstance(c, Tensor) else torch.tensor(c)
            loss = _hsic.hsic_loss(zy, zz, gamma=self.gamma)
            out = KF.HSICComponents(loss=loss, hsic_zy=zy, hsic_zz=zz, kernel_scale=c_log)
        if self.learn_scale:
            out.scale_objective = _hsic.kernel_scale_objective(
                stacked, c, num_pairs=self.num_scale_pairs, generator=generator
            )
            out.loss = out.loss + out.scale_objective
        return out

    def forward(
        self,
        *views: Tensor,
        view_dim: int | None = None,
        generator: torch.Generator | None = None,
        features: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    ) -> Tensor:
        """The SSL-HSIC loss of K >= 2 views of the same B images::

            loss = gamma * sqrt(HSIC(Z, Z)) - HSIC(Z, Y)          (+ scale_objective if learn_scale)
            HSIC(Z, Y) = (1/(B K (K-1))) sum_i ||S_i||^2 - ||mu||^2,   S_i = sum_v phi(z_i^v)
            HSIC(Z, Z) = ||Phi_B_c^T Phi_A_c||_F^2 / N^2              (N = K B, centred features)

        Args:
            *views: K >= 2 tensors ``(B, d)``, B >= 2 (row i of every view is image i), or ONE
                list/tuple of them, or one stacked 3-D tensor together with ``view_dim``.  Raw
                projector outputs are fine (``normalize=True``).  Any float dtype; same device.
            view_dim: the view axis of a single stacked tensor: 0 for ``(K, B, d)``, 1 for
                ``(B, K, d)``.  Required for a stacked tensor (never guessed); None otherwise.
            generator: a ``torch.Generator`` to draw this call's random features from, instead of
                the module's own (seeded by ``seed``).
            features: ``(w_a, b_a, w_b, b_b)`` drawn beforehand with :meth:`draw_features` (e.g.
                outside a ``torch.compile`` region); then nothing is drawn here.

        Returns:
            The loss, a 0-dim float32 tensor (float64 for float64 views), differentiable with
            respect to the views (and to c with ``learn_scale=True``).  For the terms, call
            :meth:`forward_components` with the same arguments.

        Example::

            criterion = HSICLoss()
            for x1, x2 in loader:
                loss = criterion(model(x1), model(x2))
                optimizer.zero_grad(); loss.backward(); optimizer.step()
        """
        return self._compute(views, view_dim, generator, features).loss

    def forward_components(
        self,
        *views: Tensor,
        view_dim: int | None = None,
        generator: torch.Generator | None = None,
        features: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    ) -> KF.HSICComponents:
        """Same arguments and same single pass as :meth:`forward`; returns
        :class:`~kernelssl.functional.HSICComponents`: ``loss`` (what ``forward`` returns, to call
        ``.backward()`` on), ``hsic_zy``, ``hsic_zz``, ``kernel_scale`` and ``scale_objective`` (None
        unless ``learn_scale``) -- 0-dim tensors, no host sync.

        Example::

            out = criterion.forward_components(z1, z2)
            out.loss.backward()
            log(hsic_zy=out.hsic_zy.item(), hsic_zz=out.hsic_zz.item())
        """
        return self._compute(views, view_dim, generator, features)

    def extra_repr(self) -> str:
        c = "learned" if self.learn_scale else self.kernel_scale
        return (
            f"num_features={self.num_features}, gamma={self.gamma}, kernel_scale={c}, kernel={self.kernel!r}, "
            f"normalize={self.normalize}, backend={self.backend!r}"
        )


class SFRIKLoss(nn.Module):
    """SFRIK (Zheng, Puy, Riccietti, Perez, Gribonval -- ICLR 2023): similarity + MMD to uniformity.

    ::

        L = sim_weight * R + mmd_weight * (M(Z_a) + M(Z_b)) / 2
        R = (1/(n q)) sum_i ||z_a,i^ - z_b,i^||^2
        M(Z) = (1/n^2) sum_{i,j} phi(z_i^ . z_j^),   phi(t) = sum_{l=1..L} b_l P_l(q; t)

    ``z^`` are the L2-normalised rows, ``P_l(q; .)`` the Legendre polynomials in dimension q
    (``P_l(q; 1) = 1``); ``M`` is the biased (V-statistic) MMD^2 between the batch and the uniform
    distribution on the sphere under the rotation-invariant kernel ``phi(u . v)``, diagonal included
    (SPEC §2).  The Gram is streamed in row chunks: memory O(n q), never n x n.

    Args (keyword-only):
        coefficients: ``(b_1, ..., b_L)``, any degree L >= 1 (paper: (1, 40, 40)); the kernel is
            positive definite iff every b_l >= 0.  High degrees in fp32: the gradient's relative
            error grows about as L^2 (~5e-4 at L = 100, ~3e-3 at L = 200, measured against float64;
            see :func:`kernelssl.functional.legendre_gram_mean`): beyond L ~ 50 use float64 embeddings
            if that matters.
        sim_weight: weight of R.  The paper has no default and scales it with q; 4000 is its
            q = 8192 setting (40000 at q = 32768).
        mmd_weight: weight of the mean of the two uniformity terms (paper: 1).
        gather_distributed, backend, check_finite: see the module docstring.

    Two views only (the paper's loss): ``forward(z_a, z_b)``.

    Example (a two-view training loop)::

        criterion = SFRIKLoss(sim_weight=4000.0 * q / 8192)   # the paper's weight scaled to your q
        for x1, x2 in loader:
            loss = criterion(projector(backbone(x1)), projector(backbone(x2)))
            optimizer.zero_grad(); loss.backward(); optimizer.step()
    """

    def __init__(
        self,
        *,
        coefficients: Sequence[float] = (1.0, 40.0, 40.0),
        sim_weight: float = 4000.0,
        mmd_weight: float = 1.0,
        gather_distributed: bool = False,
        backend: str = "auto",
        check_finite: bool = False,
        return_components: None = None,
    ) -> None:
        super().__init__()
        _reject_return_components(return_components)
        self.coefficients = check_coefficients(coefficients)
        self.sim_weight = check_positive(sim_weight, "sim_weight", allow_zero=True)
        self.mmd_weight = check_positive(mmd_weight, "mmd_weight", allow_zero=True)
        _check_common(gather_distributed, backend, check_finite)
        self.gather_distributed = gather_distributed
        self.backend = backend
        self.check_finite = check_finite

    @KF._fp32_compute
    def _compute(self, z_a: Tensor, z_b: Tensor) -> KF.SFRIKComponents:
        return KF.sfrik_loss(
            z_a,
            z_b,
            coefficients=self.coefficients,
            sim_weight=self.sim_weight,
            mmd_weight=self.mmd_weight,
            gather_distributed=self.gather_distributed,
            backend=self.backend,
            check_finite=self.check_finite,
            return_components=True,
        )

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """The SFRIK loss of two views of the same n images::

            loss = sim_weight * R + mmd_weight * (M(Z_a) + M(Z_b)) / 2
            R = mean over the n*q entries of (z_a^ - z_b^)^2,   M(Z) = mean_{i,j} phi(z_i^ . z_j^)

        Args:
            z_a, z_b: raw projector outputs ``(n, q)`` of the two views, n >= 2, q >= 2, same shape
                and device, any float dtype (rows are L2-normalised inside; row i of each is image i).

        Returns:
            The loss, a 0-dim float32 tensor (float64 for float64 inputs).  For the terms, call
            :meth:`forward_components`.

        Example::

            criterion = SFRIKLoss()
            for x1, x2 in loader:
                loss = criterion(model(x1), model(x2))
                optimizer.zero_grad(); loss.backward(); optimizer.step()
        """
        return self._compute(z_a, z_b).loss

    def forward_components(self, z_a: Tensor, z_b: Tensor) -> KF.SFRIKComponents:
        """Same arguments and single pass as :meth:`forward`; returns
        :class:`~kernelssl.functional.SFRIKComponents` (``loss``, ``mse`` = R, ``mmd_a``, ``mmd_b``),
        0-dim tensors, no host sync.  ``out.loss.backward()`` trains."""
        return self._compute(z_a, z_b)

    def extra_repr(self) -> str:
        return (
            f"coefficients={self.coefficients}, sim_weight={self.sim_weight}, mmd_weight={self.mmd_weight}, "
            f"backend={self.backend!r}"
        )


class MECLoss(nn.Module):
    """Maximum Entropy Coding (Liu, Wang, Li, Wang -- NeurIPS 2022), truncated matrix-log series.

    ::

        C(A, B) = lam * A^ B^T                               (m x m; rows L2-normalised)
        T_n(A, B) = tr sum_{k=1..n} (-1)^(k+1) C^k / k       (-> log det(I + C) when rho(C) < 1)
        loss = -(1/lam) * (T_n(P_a, Z_b) + T_n(P_b, Z_a)) / (2m)        scale="reference"
        loss = -mu * (T_n(P_a, Z_b) + T_n(P_b, Z_a)) / 2                  scale="paper", mu = (m+d)/2

    with ``lam = d / (m * eps_sq)`` (SPEC §3).  P are the teacher (target-branch) outputs, Z the
    online outputs; without targets the online outputs are used on both sides (not detached: pass
    ``target_a=z_a.detach()`` for a stop-gradient).  ``m`` is the batch size.

    The series is a polynomial: it never returns NaN, and is silently far from ``log det`` when the
    spectral radius of C reaches 1 (a collapsed batch has rho = lam * m = d / eps_sq).  Even orders
    are self-stabilising; the paper warms ``1/lam`` up from ``8/lam`` over 10 epochs
    (:func:`kernelssl.functional.mec_lambda_warmup`, passed as ``forward(..., lam=)``).
    :meth:`forward_components` carries a power-iteration estimate of rho (no host sync) to log;
    ``check_convergence="warn" | "raise"`` checks it on every call (one host sync); ``exact=True``
    evaluates ``log det`` exactly instead of the series, for checking.

    Args (keyword-only):
        eps_sq: distortion epsilon^2 (paper: 64).  In fp32, a lambda below ~1e-31 (a huge eps_sq)
            is refused: C's entries would underflow (:func:`kernelssl.functional.min_lambda`).
        order: series order n >= 1 (paper: 4).
        scale: ``"reference"`` (the paper's code; its hyper-parameters are tuned for it) or ``"paper"``.
        exact: use ``log det(I + C)`` (slogdet; NaN where det <= 0) instead of the series.
        check_convergence: ``"off"`` (default), ``"warn"`` (``RuntimeWarning``) or ``"raise"``
            (``ValueError``) when the estimated spectral radius of C is >= 1 in either direction.
            Opt-in because it reads rho on the host: one sync per call, plus the diagnostics' cost.
        gather_distributed, backend, check_finite: see the module docstring.

    Example (an EMA-teacher training loop, the paper's)::

        criterion = MECLoss()
        base = criterion.default_lambda(batch_size, dim)
        for step, (x1, x2) in enumerate(loader):
            lam = KF.mec_lambda_warmup(step, steps_per_epoch=len(loader), base_lam=base)
            with torch.no_grad():
                p1, p2 = teacher(x1), teacher(x2)
            loss = criterion(student(x1), student(x2), p1, p2, lam=lam)
            optimizer.zero_grad(); loss.backward(); optimizer.step()
    """

    def __init__(
        self,
        *,
        eps_sq: float = 64.0,
        order: int = 4,
        scale: str = "reference",
        exact: bool = False,
        check_convergence: str = "off",
        gather_distributed: bool = False,
        backend: str = "auto",
        check_finite: bool = False,
        return_components: None = None,
    ) -> None:
        super().__init__()
        _reject_return_components(return_components)
        self.eps_sq = check_positive(eps_sq, "eps_sq")
        self.order = check_int(order, "order", minimum=1)
        self.scale = check_choice(scale, "scale", ("reference", "paper"))
        self.exact = check_bool(exact, "exact")
        self.check_convergence = check_choice(check_convergence, "check_convergence", ("off", "warn", "raise"))
        _check_common(gather_distributed, backend, check_finite)
        self.gather_distributed = gather_distributed
        self.backend = backend
        self.check_finite = check_finite

    def default_lambda(self, m: int, d: int) -> float:
        """``lam = d / (m * eps_sq)`` for batch size m and embedding dim d (with ``gather_distributed=True``
        m is the global batch size, summed over the ranks)."""
        check_int(m, "m", minimum=1)
        check_int(d, "d", minimum=1)
        return d / (m * self.eps_sq)

    @KF._fp32_compute
    def _compute(self, z_a, z_b, target_a, target_b, lam) -> KF.MECComponents:
        return KF.mec_loss(
            z_a,
            z_b,
            target_a,
            target_b,
            eps_sq=self.eps_sq,
            order=self.order,
            scale=self.scale,
            lam=lam,
            exact=self.exact,
            gather_distributed=self.gather_distributed,
            backend=self.backend,
            check_finite=self.check_finite,
            return_components=True,
            check_convergence=self.check_convergence,
        )

    def forward(
        self,
        z_a: Tensor,
        z_b: Tensor,
        target_a: Tensor | None = None,
        target_b: Tensor | None = None,
        *,
        lam: float | Tensor | None = None,
    ) -> Tensor:
        """The MEC loss of two views (reference scale shown)::

            loss = -(1/lam) (T_n(P_a, Z_b) + T_n(P_b, Z_a)) / (2m),   C = lam * P^ Z^T,
            T_n = tr sum_{k=1..n} (-1)^(k+1) C^k / k

        Args:
            z_a, z_b: online (student, after the predictor) outputs of the two views, ``(m, d)``,
                m >= 2, raw (rows are L2-normalised inside), any float dtype.
            target_a, target_b: teacher outputs of the same views ``(m, d)`` (computed without
                gradient, e.g. an EMA copy); None uses ``z_a`` / ``z_b`` (not detached).
            lam: this step's lambda (e.g. :func:`~kernelssl.functional.mec_lambda_warmup`; a 0-dim
                tensor avoids recompiles under ``torch.compile``); None: ``d / (m eps_sq)``.

        Returns:
            The loss, a 0-dim float32 tensor (float64 for float64 inputs).  For the terms and the
            convergence diagnostics, call :meth:`forward_components`.

        Example::

            criterion = MECLoss()
            for x1, x2 in loader:
                with torch.no_grad():
                    p1, p2 = teacher(x1), teacher(x2)
                loss = criterion(student(x1), student(x2), p1, p2)
                optimizer.zero_grad(); loss.backward(); optimizer.step()
        """
        out = self._compute(z_a, z_b, target_a, target_b, lam)
        return out.loss

    def forward_components(
        self,
        z_a: Tensor,
        z_b: Tensor,
        target_a: Tensor | None = None,
        target_b: Tensor | None = None,
        *,
        lam: float | Tensor | None = None,
    ) -> KF.MECComponents:
        """Same arguments and single pass as :meth:`forward`; returns
        :class:`~kernelssl.functional.MECComponents`: ``loss``, ``t_ab``, ``t_ba``, ``coding_length``,
        ``lam``, ``spectral_radius`` (power-iteration estimate of rho(C), the series converges iff
        < 1) and ``term_ratio`` -- 0-dim tensors, no host sync."""
        return self._compute(z_a, z_b, target_a, target_b, lam)

    def extra_repr(self) -> str:
        return f"eps_sq={self.eps_sq}, order={self.order}, scale={self.scale!r}, backend={self.backend!r}"


class UniformityLoss(nn.Module):
    """Wang & Isola's uniformity (ICML 2020, "Understanding contrastive representation learning through
    alignment and uniformity on the hypersphere"; SPEC §6.1)::

        L_unif(Z; t) = log( (1/(n (n - 1))) sum_{i != j} exp(-t ||z_i^ - z_j^||^2) )
                     = log( (1/(n (n - 1))) sum_{i != j} exp(2t (z_i^ . z_j^ - 1)) )

    on the L2-normalised rows ``z^`` (diagonal excluded).  Equal to their
    ``torch.pdist(z^, p=2).pow(2).mul(-t).exp().mean().log()``, computed without the ``n (n - 1) / 2``
    distances: the Gram of unit rows is streamed in blocks (memory O(n q), never n x n) with an
    online log-sum-exp, so it is finite and right for any t (their form underflows to ``-inf`` at
    large t in fp32).  Lower is more uniform.  On CUDA the fused Triton kernel runs it
    (``backend="auto"``).

    Args (keyword-only):
        t: t > 0 (paper: 2).
        normalize: L2-normalise the rows first (default); ``False`` takes them as given (unit rows).
        gather_distributed: compute it on the batch gathered from all ranks (n global).
        backend, check_finite: see the module docstring.
        input_precision: the fused kernel's fp32 GEMM precision (``"tf32x3"`` default, ``"ieee"``,
            ``"tf32"``; SPEC §4); the torch path ignores it.

    One batch of embeddings: ``forward(z)``.  For the two-view training loss use
    :class:`AlignUniformLoss`; as a metric of frozen features use
    :func:`kernelssl.functional.uniformity` under ``torch.no_grad()``.

    Example (uniformity as a regulariser in a two-view training loop)::

        unif = UniformityLoss(t=2.0)
        for x1, x2 in loader:
            z1, z2 = projector(backbone(x1)), projector(backbone(x2))
            loss = my_invariance_loss(z1, z2) + 0.5 * (unif(z1) + unif(z2))
            optimizer.zero_grad(); loss.backward(); optimizer.step()
    """

    def __init__(
        self,
        *,
        t: float = 2.0,
        normalize: bool = True,
        gather_distributed: bool = False,
        backend: str = "auto",
        check_finite: bool = False,
        input_precision: str | None = None,
    ) -> None:
        super().__init__()
        self.t = _unif.check_t(t)
        self.normalize = check_bool(normalize, "normalize")
        _check_common(gather_distributed, backend, check_finite)
        resolve_precision(input_precision)
        self.gather_distributed = gather_distributed
        self.backend = backend
        self.check_finite = check_finite
        self.input_precision = input_precision

    def forward(self, z: Tensor) -> Tensor:
        """The uniformity of one batch of embeddings::

            loss = log( (1/(n (n - 1))) sum_{i != j} exp(-t ||z_i^ - z_j^||^2) )

        Args:
            z: ``(n, q)`` embeddings, n >= 2, any float dtype (raw projector outputs are fine:
                rows are L2-normalised inside unless ``normalize=False``).

        Returns:
            The loss, a 0-dim float32 tensor (float64 for float64 input), differentiable w.r.t. ``z``.

        Example::

            criterion = UniformityLoss()
            for x1, x2 in loader:
                z1, z2 = model(x1), model(x2)
                loss = 0.5 * (criterion(z1) + criterion(z2))
                optimizer.zero_grad(); loss.backward(); optimizer.step()
        """
        return KF.uniformity(
            z,
            self.t,
            normalize=self.normalize,
            gather_distributed=self.gather_distributed,
            backend=self.backend,
            check_finite=self.check_finite,
            input_precision=self.input_precision,
        )

    def extra_repr(self) -> str:
        return f"t={self.t}, normalize={self.normalize}, backend={self.backend!r}"


class AlignUniformLoss(nn.Module):
    """Wang & Isola's alignment + uniformity loss (ICML 2020; SPEC §6.1)::

        loss    = L_align(Z_a, Z_b) + uniformity_weight * (L_unif(Z_a) + L_unif(Z_b)) / 2
        L_align = (1/n) sum_i ||z_a^_i - z_b^_i||^alpha
        L_unif  = log( (1/(n (n - 1))) sum_{i != j} exp(-t ||z_i^ - z_j^||^2) )      (per view)

    on the L2-normalised rows ``z^`` of two views of the same n images (row i of each is image i).
    Their code: ``align_loss(x, y, alpha) + lam * (uniform_loss(x, t) + uniform_loss(y, t)) / 2``.
    The uniformity terms never store the ``n (n - 1) / 2`` distances of their ``pdist`` form (memory
    O(n q), online log-sum-exp, any t; see :class:`UniformityLoss`).

    Args (keyword-only):
        alpha: alpha > 0, the alignment's exponent (paper: 2).
        t: t > 0, the uniformity's scale (paper: 2).
        uniformity_weight: lambda >= 0, weight of the mean of the two uniformity terms (paper: 1).
        normalize: L2-normalise the rows first (default, as their encoder's output layer does).
        gather_distributed: both terms on the batch gathered from all ranks (n global).
        backend, check_finite: see the module docstring.
        input_precision: the fused kernel's fp32 GEMM precision (see :class:`UniformityLoss`).

    Example (a two-view training loop, as Wang & Isola train: no EMA teacher, no predictor)::

        criterion = AlignUniformLoss()
        for x1, x2 in loader:                       # two augmentations of the same images
            z1, z2 = projector(backbone(x1)), projector(backbone(x2))
            loss = criterion(z1, z2)
            optimizer.zero_grad(); loss.backward(); optimizer.step()
    """

    def __init__(
        self,
        *,
        alpha: float = 2.0,
        t: float = 2.0,
        uniformity_weight: float = 1.0,
        normalize: bool = True,
        gather_distributed: bool = False,
        backend: str = "auto",
        check_finite: bool = False,
        input_precision: str | None = None,
    ) -> None:
        super().__init__()
        self.alpha = _unif.check_alpha(alpha)
        self.t = _unif.check_t(t)
        self.uniformity_weight = check_positive(uniformity_weight, "uniformity_weight", allow_zero=True)
        self.normalize = check_bool(normalize, "normalize")
        _check_common(gather_distributed, backend, check_finite)
        resolve_precision(input_precision)
        self.gather_distributed = gather_distributed
        self.backend = backend
        self.check_finite = check_finite
        self.input_precision = input_precision

    def _compute(self, z_a: Tensor, z_b: Tensor) -> KF.AlignUniformComponents:
        return KF.align_uniform_loss(
            z_a,
            z_b,
            alpha=self.alpha,
            t=self.t,
            uniformity_weight=self.uniformity_weight,
            normalize=self.normalize,
            gather_distributed=self.gather_distributed,
            backend=self.backend,
            check_finite=self.check_finite,
            return_components=True,
            input_precision=self.input_precision,
        )

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """The alignment + uniformity loss of two views of the same n images::

            loss = mean_i ||z_a^_i - z_b^_i||^alpha
                   + uniformity_weight * (L_unif(Z_a; t) + L_unif(Z_b; t)) / 2
            L_unif(Z; t) = log( (1/(n (n - 1))) sum_{i != j} exp(-t ||z_i^ - z_j^||^2) )

        Args:
            z_a, z_b: raw projector outputs ``(n, q)`` of the two views, n >= 2, same shape and
                device, any float dtype (rows are L2-normalised inside unless ``normalize=False``).

        Returns:
            The loss, a 0-dim float32 tensor (float64 for float64 inputs).  For the terms, call
            :meth:`forward_components`.

        Example::

            criterion = AlignUniformLoss()
            for x1, x2 in loader:
                loss = criterion(model(x1), model(x2))
                optimizer.zero_grad(); loss.backward(); optimizer.step()
        """
        return self._compute(z_a, z_b).loss

    def forward_components(self, z_a: Tensor, z_b: Tensor) -> KF.AlignUniformComponents:
        """Same arguments and single pass as :meth:`forward`; returns
        :class:`~kernelssl.functional.AlignUniformComponents` (``loss``, ``alignment``,
        ``uniformity_a``, ``uniformity_b``), 0-dim tensors, no host sync.  ``out.loss.backward()``
        trains.

        Example::

            out = criterion.forward_components(z1, z2)
            out.loss.backward()
            log(align=out.alignment.item(), unif=(out.uniformity_a + out.uniformity_b).item() / 2)
        """
        return self._compute(z_a, z_b)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, t={self.t}, uniformity_weight={self.uniformity_weight}, "
            f"normalize={self.normalize}, backend={self.backend!r}"
        )
