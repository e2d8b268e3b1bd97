"""``python -m kernelssl``: each loss (and Wang & Isola's uniformity) on a real batch, the torch tier vs the
papers' eager form.

The batch is scikit-learn's bundled handwritten digits (8x8 images, no download): two augmented
views of each image (random one-pixel shift + pixel noise) through a fixed random linear encoder to
d dimensions.  For each loss it prints the value from the library's torch path and from the eager
form (the way the papers' code computes it), their difference, and the median forward+backward time
of each (:func:`kernelssl.bench.measure.interleaved`: the two forms timed in alternating rounds).
CPU timings compare two torch programs on this machine; they say nothing of kernel speed.
"""
from __future__ import annotations

import argparse
import platform

import numpy as np
import torch

from . import __version__
from .bench import measure
from .bench.cases import forward_backward, implementations


def digits_views(n: int, d: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two augmented views ``(n, d)`` of n digits images through a fixed random linear encoder."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(images), size=n, replace=n > len(images))
    encoder = rng.standard_normal((64, d)).astype(np.float32) / 8.0

    def view():
        x = images[idx]
        shifts = rng.integers(-1, 2, size=(n, 2))
        x = np.stack([np.roll(img, tuple(s), axis=(0, 1)) for img, s in zip(x, shifts)])
        x = x + 0.1 * rng.standard_normal(x.shape).astype(np.float32)
        return torch.from_numpy(x.reshape(n, 64) @ encoder)

    return view(), view()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kernelssl", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1024, help="images per view (default 1024)")
    p.add_argument("--dim", type=int, default=128, help="embedding dim d (default 128)")
    p.add_argument("--repeats", type=int, default=5, help="timed forward+backward runs (default 5)")
    p.add_argument("--quick", action="store_true", help="batch 256, 2 repeats (for CI)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 256, 2
    n, d = args.batch, args.dim
    device = "cuda" if torch.cuda.is_available() else "cpu"
    za, zb = digits_views(n, d)
    za, zb = za.to(device), zb.to(device)
    where = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    print(f"kernelssl {__version__}, torch {torch.__version__}, {device} ({where}), "
          f"{torch.get_num_threads()} threads; digits batch n={n}, d={d}, fp32")

    shapes = {"hsic": {"K": 2, "B": n, "d": d, "D": 512}, "sfrik": {"n": n, "q": d}, "mec": {"m": n, "d": d},
              "uniformity": {"n": n, "q": d}}
    zan = torch.nn.functional.normalize(za, dim=-1)
    zbn = torch.nn.functional.normalize(zb, dim=-1)
    # (tensor, differentiated?) -- SSL-HSIC's reference normalises before the loss; MEC has no
    # teacher here, so its targets are the online outputs without gradient.
    inputs = {
        "hsic": ((torch.stack([zan, zbn]), True),),
        "sfrik": ((za, True), (zb, True)),
        "mec": ((za, True), (zb, True), (za, False), (zb, False)),
        "uniformity": ((za, True),),  # Wang & Isola's uniformity of one view (normalised inside)
    }
    header = (f"{'loss':10} {'torch path':>14} {'eager':>14} {'|diff|':>9} {'torch ms':>9} {'eager ms':>9} "
              f"{'speed-up':>8}")
    print(header)
    print("-" * len(header))
    for loss, shape in shapes.items():
        leaves = tuple(x.detach().clone().requires_grad_(grad) for x, grad in inputs[loss])
        impls = implementations(loss, shape, device=device, names=("torch", "eager"))
        values = {name: forward_backward(impls[name], leaves) for name in impls}  # also the warm-up call
        steps = {name: (lambda fn=impls[name]: forward_backward(fn, leaves)) for name in impls}
        runs = measure.interleaved(steps, torch.device(device), repeats=args.repeats)
        times = {name: measure.median(r) * 1e3 for name, r in runs.items()}
        diff = abs(float(values["torch"]) - float(values["eager"]))
        print(
            f"{loss:10} {float(values['torch']):14.6g} {float(values['eager']):14.6g} {diff:9.2e} "
            f"{times['torch']:9.2f} {times['eager']:9.2f} {times['eager'] / times['torch']:7.2f}x"
        )


if __name__ == "__main__":
    main()
