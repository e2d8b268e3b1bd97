"""``HSICLoss`` (Li, Pogodin, Sutherland, Gretton -- NeurIPS 2021) on the ``rff_hsic`` op."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import functional as KF
from .._checks import check_bool, check_int, check_positive, check_tensor
from .._checks import check_finite as assert_finite
from ..functional._common import as_views, assert_finite_hyper, fp32_compute, gather_views, positive_or_nan
from ..functional.hsic import check_generator, check_map, check_scale, hsic_components
from ..ops import rff_hsic as _ops
from ..ops._common import prescale_rows, upcast
from ..ops.rff_hsic import check_kernel
from ._common import LossModule

__all__ = ["HSICLoss"]

Tensor = torch.Tensor


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
        return as_views(stacked if view_dim == 0 else stacked.transpose(0, 1))
    if view_dim is not None:
        raise ValueError(
            f"view_dim: expected None unless the views come as one stacked 3-D tensor, got view_dim={view_dim!r} "
            f"with {len(views)} argument(s)"
        )
    return as_views(views)


class HSICLoss(LossModule):
    """SSL-HSIC (Li, Pogodin, Sutherland, Gretton -- NeurIPS 2021), linear in the batch size.

    ::

        loss = gamma * sqrt(HSIC(Z, Z)) - HSIC(Z, Y)

    ``HSIC(Z, Y)`` is the dependence between embeddings and image identity (row index), ``HSIC(Z, Z)``
    the redundancy penalty, both with a shift-invariant kernel -- the paper's inverse multiquadric
    ``k_c(x, y) = c / sqrt(||x - y||^2 + c^2)`` by default -- approximated by ``num_features`` random
    Fourier features, two independent maps redrawn at every call (docs/rff_hsic.md).  Cost
    O(N d D + N D^2), memory O(N D + D^2) for N = B*K embeddings: never an N x N matrix.

    Args (keyword-only):
        num_features: D, the number of random Fourier features per map (paper: 512).
        gamma: weight of ``sqrt(HSIC(Z, Z))`` (paper: 3).
        kernel_scale: the kernel scale c (paper: learned from 1.0).
        learn_scale: own c as a parameter and learn it with the paper's side objective, minus
            ``mean 1/2 log (dk/drho)^2`` over ``num_scale_pairs`` sampled pairs (no gradient to the
            embeddings): ``-log(c/2) + 1.5 mean log(rho + c^2)`` for IMQ (rho = squared distances),
            ``log(2 c^2) + mean(rho) / (2 c^2)`` for Gaussian (optimum c^2 = mean rho / 2),
            ``log(c) + mean(r) / c`` for Laplace (r = l1 distances, optimum c = mean r); see
            :func:`kernelssl.functional.kernel_scale_objective`.  The module then returns
            ``hsic_loss + scale_objective``: the embeddings get gradients from the first term only
            (c is stop-gradient there), c from the second only.  Give ``loss.parameters()`` its own
            optimiser (the paper: Adam, lr 3e-4).  The learned c is never read on the host: should
            an optimiser drive it to <= 0, the loss becomes NaN (not a silent number).
        kernel: the kernel family: ``"imq"`` (the paper's, default), ``"gaussian"``
            (``exp(-||x - y||^2 / (2 c^2))``, random features ``W ~ N(0, I)``) or ``"laplace"``
            (``exp(-||x - y||_1 / c)``, iid standard Cauchy ``W``); :func:`kernelssl.functional.sample_rff`.
            Laplace random features give unbiased values but gradients of infinite variance (Cauchy
            W): on digits they did not train; ``kernel="laplace", exact=True`` did (see
            :mod:`kernelssl.ops.rff_hsic`).  The Laplace scale should be of the order of the l1 distances
            (~1.1 sqrt(d) between unrelated unit rows of dimension d), not the IMQ default 1.
        exact: use the exact kernel instead of random features (O(N^2) memory; for checking).
            Nothing random is drawn then.
        normalize: L2-normalise each embedding first (default True, as the paper's code does before
            the loss).  The loss is not scale-invariant without it: on raw projector outputs (||z|| ~ 10) the
            IMQ kernel with c = 1 sees nearly orthogonal far-apart points and the loss did not learn
            (``benchmarks/lightly_style_digits.py``).  ``False`` takes the rows as given (for rows you
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
        kernel: str = "imq",
        exact: bool = False,
        normalize: bool = True,
        num_scale_pairs: int = 1024,
        seed: int = 0,
        gather_distributed: bool = False, backend: str = "auto", check_finite: bool = False,
    ) -> None:
        super().__init__(gather_distributed, backend, check_finite)
        num_features = check_int(num_features, "num_features", minimum=1)
        check_positive(gamma, "gamma", allow_zero=True)
        check_scale(kernel_scale)
        check_bool(learn_scale, "learn_scale")
        check_kernel(kernel)
        check_bool(exact, "exact")
        if kernel == "laplace" and not exact:
            warnings.warn(
                "HSICLoss(kernel='laplace') with random features: the Cauchy frequencies give an unbiased "
                "loss but a gradient of infinite variance, which did not train on digits (linear probe "
                "0.713 vs 0.750 for the random-init encoder; exact=True: 0.879). Pass exact=True (O(N^2) "
                "memory) or use kernel='gaussian'.",
                UserWarning,
                stacklevel=2,
            )
        check_bool(normalize, "normalize")
        num_scale_pairs = check_int(num_scale_pairs, "num_scale_pairs", minimum=1)
        seed = check_int(seed, "seed", minimum=0, maximum=2**64 - 1)  # what torch.Generator.manual_seed takes
        self.num_features = num_features
        self.gamma = float(gamma)
        self.learn_scale = learn_scale
        self.kernel = kernel
        self.exact = exact
        self.normalize = normalize
        self.num_scale_pairs = num_scale_pairs
        self.seed = seed
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

    def draw_features(
        self, dim: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, ...]:
        """Everything random that ``forward`` would draw next for ``(K, B, dim)`` views of ``dtype`` on
        ``device``, from the module's generator for that device, in the same order, advancing it the
        same way: the two maps ``(w_a, b_a, w_b, b_b)`` (float64 for float64 views, else float32) and,
        with ``learn_scale=True``, then the scale objective's pairs (a ``(2, m)`` float64 tensor of
        uniforms, :func:`kernelssl.ops.rff_hsic.draw_scale_pairs`) as a fifth entry.  Pass the tuple
        as ``forward(..., features=...)``: eager and compiled steps then compute the same numbers, step
        after step.  ``dtype`` is the views' floating dtype (float16, bfloat16, float32 or float64).
        """
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(
                f"dtype: expected the views' floating dtype (torch.float16, torch.bfloat16, torch.float32 or "
                f"torch.float64), got {dtype!r}"
            )
        device = torch.device(device)
        return self._draw(dim, device, dtype, self._generator(device))

    def _draw(self, dim: int, device: torch.device, dtype: torch.dtype, gen: torch.Generator | None) -> tuple:
        dt = torch.float64 if dtype == torch.float64 else torch.float32
        w_a, b_a = KF.sample_rff(self.kernel, dim, self.num_features, generator=gen, device=device, dtype=dt)
        w_b, b_b = KF.sample_rff(self.kernel, dim, self.num_features, generator=gen, device=device, dtype=dt)
        if not self.learn_scale:
            return w_a, b_a, w_b, b_b
        if gen is None:  # meta tensors: nothing is drawn
            m = max(1, int(round(self.num_scale_pairs ** 0.5)))
            return w_a, b_a, w_b, b_b, torch.empty((2, m), device=device, dtype=torch.float64)
        return w_a, b_a, w_b, b_b, _ops.draw_scale_pairs(self.num_scale_pairs, gen, device)

    @fp32_compute
    def _compute(self, views: tuple, view_dim, generator, features) -> KF.HSICComponents:
        stacked = _hsic_views(views, view_dim)
        check_generator(generator)
        if features is not None:
            if self.exact:
                raise ValueError(
                    "features: expected None with exact=True (maps are for the random-feature path, "
                    "exact=False), got maps"
                )
            if generator is not None:
                raise ValueError(
                    "generator: expected None when features= is given (everything random was drawn with "
                    "the features), got a torch.Generator"
                )
            want = 5 if self.learn_scale else 4
            names = "(w_a, b_a, w_b, b_b, pairs)" if self.learn_scale else "(w_a, b_a, w_b, b_b)"
            if not isinstance(features, (tuple, list)) or len(features) != want:
                got = f"{len(features)} entries" if isinstance(features, (tuple, list)) else type(features).__name__
                raise TypeError(
                    f"features: expected a tuple {names} as returned by draw_features "
                    f"(learn_scale={self.learn_scale}), got {got}"
                )
            d = stacked.shape[-1]
            check_map(features[0], features[1], d, stacked.device, "features[0]", "features[1]")
            check_map(features[2], features[3], d, stacked.device, "features[2]", "features[3]")
            if self.learn_scale:
                check_tensor(features[4], "features[4]", ndim=2)
                if features[4].shape[0] != 2:
                    raise ValueError(f"features[4]: expected the (2, m) scale pairs of draw_features, "
                                     f"got shape {tuple(features[4].shape)}")
        elif generator is None and not self.exact:
            generator = self._generator(stacked.device)
        if self.check_finite:  # before normalising (the row scaling would spread a NaN over its row)
            given = [stacked, *(features or ())[:4]]
            assert_finite(given, ["views", *(f"features[{i}]" for i in range(len(given) - 1))])
            assert_finite_hyper(self.kernel_scale, "kernel_scale")  # a learned scale can leave (0, inf)
        if self.normalize:  # the norm in fp32 (a half norm overflows above 65504 and rounds); the unit rows
            # go back to the views' dtype, so that 16-bit views stay on the fused kernel's 16-bit products
            stacked = torch.nn.functional.normalize(prescale_rows(upcast(stacked)), dim=-1).to(stacked.dtype)
        if self.gather_distributed:
            # Everything random is drawn after the gather from `generator`: check it agrees on all ranks.
            stacked = gather_views(stacked, generator if generator is not None else False)
        c = self.kernel_scale
        maps = features
        if maps is None and not self.exact:  # what draw_features gives, from this call's generator
            maps = self._draw(stacked.shape[-1], stacked.device, stacked.dtype, generator)
        pairs = maps[4] if self.learn_scale and maps is not None else None
        maps = None if maps is None else maps[:4]
        out = hsic_components(stacked, maps, gamma=self.gamma, kernel_scale=positive_or_nan(c), kernel=self.kernel,
                              exact=self.exact, backend=self.backend, input_precision=None)
        if self.learn_scale:
            out.scale_objective = _ops.kernel_scale_objective(
                stacked, c, num_pairs=self.num_scale_pairs, generator=generator, kernel=self.kernel, pairs=pairs
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
            f"exact={self.exact}, normalize={self.normalize}, backend={self.backend!r}"
        )
