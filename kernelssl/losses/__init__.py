"""Drop-in ``nn.Module`` losses: :class:`HSICLoss`, :class:`SFRIKLoss`, :class:`MECLoss`, and Wang & Isola's
:class:`UniformityLoss` and :class:`AlignUniformLoss` (docs/api.md), one file per loss.

Each is a thin module over :mod:`kernelssl.functional`: keyword-only hyper-parameters with the
papers' defaults, ``backend="auto" | "triton" | "torch"``, and ``check_finite=True`` to raise on
NaN/Inf inputs (by default they propagate to a NaN loss -- never a silent finite number).
``forward`` always returns the scalar loss tensor (so ``loss.backward()`` always works);
``forward_components(...)`` takes the same arguments and returns, from the same single pass, a small
dataclass of the terms to log that holds the loss too (lightly's idiom).

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
from .hsic_loss import HSICLoss
from .mec_loss import MECLoss
from .sfrik_loss import SFRIKLoss
from .uniformity_loss import AlignUniformLoss, UniformityLoss

__all__ = ["HSICLoss", "SFRIKLoss", "MECLoss", "UniformityLoss", "AlignUniformLoss", "LOSSES"]

#: The short names of the four losses, as the training script (``--loss``) and the bench spell them.
LOSSES = ("hsic", "sfrik", "mec", "uniformity")
