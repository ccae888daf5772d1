"""The MIL model: an optional patch backbone followed by a MIL pooling head, one bag at a time.

Two training modes use :class:`MILModel`:

end-to-end
    ``MILModel(backbone, head)``: the backbone embeds each patch of the bag ``(N, 3, T, T)`` and is
    trained through the MIL pooling. Normalisation happens inside the model
    (:class:`~wsi_pipeline.models.backbones.PatchNormalize`: uint8 ``[0, 255]`` or float ``[0, 1]``
    → ImageNet mean/std).
features
    ``MILModel(None, head)``: the head trains on cached features ``(N, D)`` made once by a frozen
    backbone (``MILModel.embed``).
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from .backbones import PatchNormalize

__all__ = ["MILModel", "MILOutput"]

#: Patches per backbone chunk when ``grad_checkpoint=True`` and no ``chunk_size`` is given.
DEFAULT_CHECKPOINT_CHUNK = 64


class MILOutput(NamedTuple):
    """What every MIL head (and :class:`MILModel`) returns for one bag of ``N`` instances.

    Attributes
    ----------
    logits : (C,) Tensor
        Slide logits.
    patch_logits : (N, C) Tensor
        Per-instance logits: the source of per-patch abnormality scores (heatmaps).
    attention : (N,) float32 Tensor or None
        Attention weights (softmax over the bag, sums to 1); ``None`` for heads without attention.
    """

    logits: Tensor
    patch_logits: Tensor
    attention: Tensor | None


@contextlib.contextmanager
def _frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Keep BatchNorm running stats unchanged (used for the checkpoint recomputation).

    In training mode BatchNorm normalises with batch statistics whatever its momentum; with
    momentum 0 the running-stat update is a no-op, so the recomputation in backward does not
    count each chunk twice. ``num_batches_tracked`` is restored on exit.
    """
    layers = [
        (m, m.momentum, m.num_batches_tracked.clone())
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.training
        and m.track_running_stats
        and m.num_batches_tracked is not None
    ]
    for m, _, _ in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in layers:
            m.momentum = momentum
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class MILModel(nn.Module):
    """Patch backbone (optional) + MIL head; ``forward`` takes one bag and returns :class:`MILOutput`.

    Parameters
    ----------
    backbone : torch.nn.Module or None
        Maps normalised patches ``(N, 3, T, T)`` to ``(N, D)``; ``None`` for features mode.
    head : torch.nn.Module
        A MIL head: ``head(h)`` with ``h`` : (N, D) returns :class:`MILOutput`. Must have an
        ``in_dim`` attribute (``D``).
    grad_checkpoint : bool
        Run the backbone under :func:`torch.utils.checkpoint.checkpoint` (``use_reentrant=False``),
        one chunk of patches at a time, so that activation memory is bounded by one chunk instead
        of the whole bag. Gradients are identical to ``grad_checkpoint=False`` with the same
        ``chunk_size`` (BatchNorm running stats are updated once, not again during recompute).
        Only active while autograd is recording.
    chunk_size : int, optional
        Patches per backbone pass. ``None``: the whole bag in one pass, or
        ``DEFAULT_CHECKPOINT_CHUNK`` (64) patches per chunk with ``grad_checkpoint``. In training
        mode BatchNorm statistics are per chunk, so compare runs with the same ``chunk_size``.

    Attributes
    ----------
    in_dim : int
        ``D``, the embedding size the head takes.
    normalize : PatchNormalize or None
        The input normalisation (end-to-end mode only).
    """

    feature_mean: Tensor  # buffers of features mode (see set_feature_stats)
    feature_std: Tensor

    def __init__(
        self,
        backbone: nn.Module | None,
        head: nn.Module,
        *,
        grad_checkpoint: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if chunk_size is not None and (
            isinstance(chunk_size, bool)
            or not isinstance(chunk_size, numbers.Integral)
            or chunk_size < 1
        ):
            raise ConfigError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        self.backbone = backbone
        self.head = head
        self.normalize = PatchNormalize() if backbone is not None else None
        self.grad_checkpoint = bool(grad_checkpoint)
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        in_dim: Any = head.in_dim
        self.in_dim = int(in_dim)
        if backbone is None:
            # cached features are standardised per dimension (set by the trainer from the
            # training slides; identity until then) -- frozen-backbone features differ in scale
            # by orders of magnitude
            self.register_buffer("feature_mean", torch.zeros(self.in_dim))
            self.register_buffer("feature_std", torch.ones(self.in_dim))

    def set_feature_stats(self, mean: Tensor, std: Tensor) -> None:
        """Standardise cached features with these per-dimension statistics (features mode)."""
        if self.backbone is not None:
            raise ConfigError("feature statistics only apply to a model without a backbone")
        self.feature_mean.copy_(mean.to(self.feature_mean))
        self.feature_std.copy_(std.clamp_min(1e-6).to(self.feature_std))

    def _embed_chunk(self, x: Tensor) -> Tensor:
        assert self.backbone is not None and self.normalize is not None
        return self.backbone(self.normalize(x))

    def embed(self, x: Tensor) -> Tensor:
        """Instance embeddings of one bag.

        Runs under the caller's grad mode: wrap in :func:`torch.inference_mode` to cache features,
        call it with grad enabled for end-to-end training (e.g. to pass the same ``h`` to
        :meth:`head_forward` and to ``head.instance_loss``).

        Parameters
        ----------
        x : (N, 3, T, T) uint8 or float Tensor, or (N, D) float Tensor without a backbone
            Patches (uint8 ``[0, 255]`` or float ``[0, 1]``; normalised inside), any memory format.

        Returns
        -------
        (N, D) Tensor
            Embeddings (in features mode: the input, standardised with the feature statistics).
        """
        if self.backbone is None:
            self._check_features(x)
            return (x - self.feature_mean) / self.feature_std
        if x.ndim != 4 or x.shape[1] != 3:
            raise ConfigError(f"expected patches of shape (N, 3, T, T), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ConfigError("empty bag: 0 patches")
        chunk = self.chunk_size
        use_ckpt = self.grad_checkpoint and torch.is_grad_enabled()
        if chunk is None and use_ckpt:
            chunk = DEFAULT_CHECKPOINT_CHUNK
        if chunk is None or chunk >= x.shape[0]:
            chunks = [x]
        else:
            chunks = list(torch.split(x, chunk, dim=0))
        if not use_ckpt:
            outs = [self._embed_chunk(c) for c in chunks]
        else:
            backbone = self.backbone

            def contexts() -> tuple[
                contextlib.AbstractContextManager, contextlib.AbstractContextManager
            ]:
                return contextlib.nullcontext(), _frozen_batchnorm_stats(backbone)

            outs = [
                checkpoint(self._embed_chunk, c, use_reentrant=False, context_fn=contexts)
                for c in chunks
            ]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def _check_features(self, h: Tensor) -> None:
        if h.ndim != 2 or h.shape[1] != self.in_dim:
            raise ConfigError(
                f"expected features of shape (N, {self.in_dim}), got {tuple(h.shape)}"
                + ("; this model has a backbone and takes patches" if self.backbone else "")
            )

    def head_forward(self, h: Tensor) -> MILOutput:
        """Run only the MIL head on embeddings ``h`` : (N, D) → :class:`MILOutput`."""
        self._check_features(h)
        return self.head(h)

    def forward(self, x: Tensor, sizes: list[int] | None = None) -> Any:
        """One bag → :class:`MILOutput`; several bags in one backbone pass with ``sizes``.

        Parameters
        ----------
        x : (N, 3, T, T) uint8 or float Tensor (end-to-end), or (N, D) Tensor (features mode)
            One bag, or the bags of a training step concatenated (then ``sum(sizes) == N``).
        sizes : list of int, optional
            Instances per bag. The backbone embeds all ``N`` instances at once (in training
            mode BatchNorm normalises over the patches of every slide of the step, not over one
            slide), then the head pools each bag on its own.

        Returns
        -------
        MILOutput, or list of MILOutput with ``sizes``
            ``logits`` (C,), ``patch_logits`` (N_i, C), ``attention`` (N_i,) or None, per bag.
        """
        h = self.embed(x)
        if sizes is None:
            return self.head_forward(h)
        if sum(sizes) != h.shape[0] or any(int(n) < 1 for n in sizes):
            raise ConfigError(f"bag sizes {sizes} do not split {h.shape[0]} instances")
        return [self.head_forward(part) for part in torch.split(h, list(sizes), dim=0)]
