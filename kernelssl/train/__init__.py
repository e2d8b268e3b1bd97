"""``python -m kernelssl.train``: self-supervised pretraining with one of the kernel losses, then a
linear probe and a k-NN probe against a randomly initialised encoder of the same architecture.

Offline by default: ``--dataset digits`` is scikit-learn's bundled 8x8 handwritten digits, so the
default run needs no download and finishes in about a minute on two CPU cores.

Losses and their recipes (:data:`RECIPES`; every entry can be overridden on the command line):

* ``hsic``  -- SSL-HSIC with a BYOL-style EMA target network and K = 4 embedding sets: the online
  predictions of views 1 and 2 and the target projections of views 2 and 1 (docs/rff_hsic.md), L2-normalised,
  kernel scale learned by the paper's side objective (its own Adam).
* ``sfrik`` -- SFRIK on the projections of the two views, no target network; ``sim_weight``
  250 at q = 128 on digits (4x the paper's q = 8192 value scaled to q), ``4000 * q / 8192`` otherwise.
* ``mec``   -- MEC with an EMA teacher, a predictor on the student and the reference lambda warm-up
  (``1/lam`` from ``8/lam`` to ``1/lam`` over the first ``mec_warmup`` epochs).
* ``uniformity`` -- Wang & Isola's alignment + uniformity: ``L_align(z1, z2) + lambda
  (L_unif(z1) + L_unif(z2)) / 2`` on the L2-normalised projections of the two views, alpha = 2, t = 2,
  lambda = 1, no target network and no predictor (as they train it).  Their STL-10 recipe (SGD,
  batch 768, lr 0.12 per 256 images, weight decay 1e-4, feature dim 128) becomes this table's
  digits recipe: batch 64 and AdamW lr 2e-3 like the other losses, weight decay 1e-4, q = 128.

Evaluation (rank 0, frozen backbone features, no augmentation): a logistic-regression linear probe
on standardised features and a cosine k-NN (k = 20, similarity-weighted votes), both trained on the
probe-training split and scored on the held-out test split.  Every run also reports the uniformity
(Wang & Isola, t = 2) of the L2-normalised test-split features, trained and random-init
(``probe_uniformity``, ``baseline_probe_uniformity``: ``log(mean_{i != j} exp(-2 ||f_i - f_j||^2))`` on
unit rows, in [-4 n/(n-1), 0]; lower is more uniform).  On digits the probe sees only
``--probe-labels`` labelled images per class (default 5), drawn ``--probe-repeats`` times (default 5)
with fixed seeds 0, 1, ... (independent of ``--seed``); the reported accuracies are means over the
draws.  With all 1257 labels a random convolutional encoder already reaches ~93 % on digits (97-98 %
at width 32) and a trained one 97-99 %: a full-label probe barely tells them apart (it is reported
too, as ``*_all_labels``).  The baseline is the online backbone at its initialisation (same seed), never
trained.

Measured on digits with the defaults (2 CPU cores, 1 compute thread + 1 augmentation worker;
seeds 0, 1, 2): linear probe 0.90-0.93 against 0.75-0.77 for the random-init encoder (raw pixels:
0.82) -- margins hsic +15.7 points on average (min +13.4), sfrik +14.5 (min +13.3), mec +15.9
(min +14.8); 61-77 s wall per run, 85-121 s CPU (user + sys, worker included).  uniformity (seeds 0, 1,
2, measured later on the machine shared with other jobs): linear probe .906 / .903 / .909 against .750 /
.756 / .766, k-NN .880 / .878 / .891 against .544 / .564 / .594; 97-110 s of user CPU per run.

Outputs in ``--out``: ``checkpoint.pt`` (every epoch, written atomically; ``--resume`` continues to
bit-identical results on CPU), ``log.csv`` (one row per epoch: the loss components), ``results.json``
(``seconds`` is the pretraining wall time summed over resumed segments, ``cpu_seconds`` the CPU time
of the main process in it -- data-loader workers not included).

Data: ``--dataset digits`` (default), ``cifar10`` / ``stl10`` (their on-disk formats under
``--data-dir``, read by :mod:`kernelssl.train.data`; ``--download`` fetches them) or ``imagefolder PATH``
(``python -m kernelssl.train --dataset imagefolder PATH``; PATH is the same as ``--data-dir PATH``).
``--arch smallcnn`` works on every dataset (width 32 on natural images unless ``--width``).  Loader
workers default to the cores each process has left after one compute thread (at most 1 on digits,
4 otherwise): 1 on a 2-core machine, 0 on one core.

MEC's convergence: the estimated spectral radius of C is logged every epoch (``spectral_radius``, the
epoch mean, and ``spectral_radius_max``); ``--mec-check warn|raise`` also checks it at every step
(one host sync per step) and warns or stops when it reaches 1.

Distributed: ``torchrun --nproc_per_node=N -m kernelssl.train ...`` runs DDP (gloo on CPU, NCCL on
CUDA) with a DistributedSampler; ``--batch-size`` is the global batch and the loss is computed on the
gathered global batch (``gather_distributed=True``).

Modules: :mod:`.cli` (recipes and the command line), :mod:`.loop` (the training loop, checkpoints, the
run), :mod:`.probes` (the evaluation), :mod:`.data` (datasets and augmentations), :mod:`.models`
(backbones, heads, EMA targets).
"""
from .cli import RECIPES, machine_defaults, parse_args
from .loop import build_criterion, main, run
from .probes import evaluate, feature_uniformity

__all__ = ["RECIPES", "main", "run", "parse_args", "machine_defaults", "build_criterion", "evaluate",
           "feature_uniformity"]
