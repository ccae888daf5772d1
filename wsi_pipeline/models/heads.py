"""MIL pooling heads and the registered model builders.

Every head maps the instance embeddings of one bag, ``h`` : (N, D), to a
:class:`~wsi_pipeline.models.MILOutput` ``(logits (C,), patch_logits (N, C), attention (N,) | None)``.
Each head first projects instances with ``Linear(D, hidden_dim) → ReLU → Dropout`` (``h'``); the
slide classifier applied to each ``h'_i`` gives ``patch_logits``. Attention is a softmax over the
bag computed in float32 (also under float16/bfloat16 autocast). Losses live in training code;
only CLAM's instance-clustering loss is exposed (:meth:`CLAMSingleBranch.instance_loss`) because it
needs the head's internals.

Registered models (see :func:`~wsi_pipeline.models.list_models`):

=============== ============================================================================
``abmil``        attention MIL (Ilse et al. 2018): ``a = softmax(w^T tanh(V h'))``
``gated_abmil``  gated attention: ``a = softmax(w^T (tanh(V h') ⊙ sigmoid(U h')))``
``clam_sb``      CLAM single branch (Lu et al. 2021): gated attention + instance classifiers
``maxmil``       instance classifier, slide logits = logits of the top instance (Campanella 2019)
``topk``         mean of the logits of the top ``k`` instances
``meanmil``      mean of instance embeddings → classifier
=============== ============================================================================
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .backbones import get_backbone
from .mil import MILModel, MILOutput
from .registry import register_model

__all__ = [
    "AttentionMIL",
    "CLAMSingleBranch",
    "InstanceMIL",
    "MeanMIL",
    "abmil",
    "clam_sb",
    "gated_abmil",
    "maxmil",
    "meanmil",
    "topk",
]


# ---------------------------------------------------------------------------------------------
# validation helpers


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_dropout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= float(value) < 1:
        raise ConfigError(f"dropout must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_bag(h: Tensor, in_dim: int) -> None:
    if h.ndim != 2 or h.shape[1] != in_dim:
        raise ConfigError(
            f"expected instance embeddings of shape (N, {in_dim}), got {tuple(h.shape)}"
        )
    if h.shape[0] == 0:
        raise ConfigError("empty bag: 0 instances")


def _projection(in_dim: int, hidden_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Dropout(dropout))


# ---------------------------------------------------------------------------------------------
# heads


class AttentionMIL(nn.Module):
    """Attention-based MIL pooling (Ilse et al. 2018), plain or gated.

    ``h' = Dropout(ReLU(W h))``; scores ``s = w^T tanh(V h')`` (plain) or
    ``w^T (tanh(V h') ⊙ sigmoid(U h'))`` (gated); ``a = softmax(s)`` over the bag (float32);
    ``z = Σ a_i h'_i``; ``logits = classifier(z)``; ``patch_logits = classifier(h')``.

    Parameters
    ----------
    in_dim : int
        ``D``.
    num_classes : int
        ``C >= 2`` (binary is ``C = 2``).
    hidden_dim : int
        Size of ``h'``.
    attn_dim : int
        Size of the attention hidden layer.
    dropout : float
        Dropout after the projection.
    gated : bool
        Gated attention.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        hidden_dim: int = 128,
        attn_dim: int = 128,
        dropout: float = 0.25,
        gated: bool = False,
    ) -> None:
        super().__init__()
        self.in_dim = _check_int("in_dim", in_dim, 1)
        self.num_classes = _check_int("num_classes", num_classes, 2)
        hidden_dim = _check_int("hidden_dim", hidden_dim, 1)
        attn_dim = _check_int("attn_dim", attn_dim, 1)
        self.proj = _projection(in_dim, hidden_dim, _check_dropout(dropout))
        self.attn_v = nn.Linear(hidden_dim, attn_dim)
        self.attn_u = nn.Linear(hidden_dim, attn_dim) if gated else None
        self.attn_w = nn.Linear(attn_dim, 1, bias=False)  # softmax is shift-invariant
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def attention_scores(self, hp: Tensor) -> Tensor:
        """Unnormalised attention scores ``(N,)`` of projected instances ``hp`` : (N, hidden_dim)."""
        gate = torch.tanh(self.attn_v(hp))
        if self.attn_u is not None:
            gate = gate * torch.sigmoid(self.attn_u(hp))
        return self.attn_w(gate).squeeze(-1)

    def _project_attend(self, h: Tensor) -> tuple[Tensor, Tensor]:
        _check_bag(h, self.in_dim)
        hp = self.proj(h)
        attention = torch.softmax(self.attention_scores(hp).float(), dim=0)
        return hp, attention

    def forward(self, h: Tensor) -> MILOutput:
        """Pool one bag ``h`` : (N, D) → ``MILOutput(logits (C,), patch_logits (N, C), attention (N,))``."""
        hp, attention = self._project_attend(h)
        z = attention.to(hp.dtype) @ hp
        return MILOutput(self.classifier(z), self.classifier(hp), attention)


class CLAMSingleBranch(AttentionMIL):
    """CLAM single-branch head (Lu et al. 2021): gated attention MIL + instance classifiers.

    ``forward`` is gated attention MIL (see :class:`AttentionMIL`). The instance-level
    clustering loss, added to the slide loss in training (CLAM weights it 0.3 vs 0.7), is
    :meth:`instance_loss`.

    Parameters
    ----------
    in_dim, num_classes, hidden_dim, attn_dim, dropout
        As :class:`AttentionMIL`.
    subtyping : bool
        Mutually exclusive subtypes: also push the most-attended instances of the other classes'
        instance classifiers to "out of class" (CLAM ``subtyping=True``).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        hidden_dim: int = 128,
        attn_dim: int = 128,
        dropout: float = 0.25,
        subtyping: bool = False,
    ) -> None:
        super().__init__(
            in_dim,
            num_classes,
            hidden_dim=hidden_dim,
            attn_dim=attn_dim,
            dropout=dropout,
            gated=True,
        )
        self.subtyping = bool(subtyping)
        self.instance_classifiers = nn.ModuleList(
            nn.Linear(hidden_dim, 2) for _ in range(num_classes)
        )

    def instance_loss(self, h: Tensor, label: int | Tensor, *, k_sample: int = 8) -> Tensor:
        """CLAM's instance-clustering loss for one bag.

        With ``k = min(k_sample, N // 2)``, the ``k`` most- and ``k`` least-attended instances
        train the instance classifier of the slide's class as in-class (1) and out-of-class (0)
        (cross-entropy). With ``subtyping`` the ``k`` most-attended instances are also
        out-of-class for every other class's classifier, and the sum is divided by ``C``.
        Instance selection uses the attention without gradient through the selection.

        Parameters
        ----------
        h : (N, D) Tensor
            The same instance embeddings given to ``forward`` (features, or ``MILModel.embed(x)``).
        label : int or 0-d integer Tensor
            The slide label, in ``[0, C)``.
        k_sample : int
            Instances sampled from each end of the attention ranking.

        Returns
        -------
        0-d float32 Tensor
            The loss; zero (still connected to the graph) for a bag of one instance.
        """
        _check_int("k_sample", k_sample, 1)
        label = int(label)
        if not 0 <= label < self.num_classes:
            raise ConfigError(f"label must be in [0, {self.num_classes}), got {label}")
        hp, attention = self._project_attend(h)
        k = min(k_sample, hp.shape[0] // 2)
        if k < 1:
            return hp.float().sum() * 0.0
        top = torch.topk(attention.detach(), k).indices
        bottom = torch.topk(-attention.detach(), k).indices
        ones = torch.ones(k, dtype=torch.long, device=hp.device)
        losses = []
        for i, classifier in enumerate(self.instance_classifiers):
            if i == label:
                inputs = torch.cat([hp[top], hp[bottom]])
                targets = torch.cat([ones, torch.zeros_like(ones)])
            elif self.subtyping:
                inputs, targets = hp[top], torch.zeros_like(ones)
            else:
                continue
            losses.append(F.cross_entropy(classifier(inputs).float(), targets))
        loss = torch.stack(losses).sum()
        return loss / self.num_classes if self.subtyping else loss


class InstanceMIL(nn.Module):
    """Instance-level MIL: classify every instance, pool the logits of the top ``k`` instances.

    ``patch_logits = classifier(Dropout(ReLU(W h)))``. With ``k`` clipped to ``N``:

    - binary (``C = 2``): instances are ranked by the positive-class margin ``l_1 - l_0``
      (equivalently their positive probability, Campanella et al. 2019) and ``logits`` is the
      mean logit vector of the top ``k`` instances (``k = 1``: the top instance's logits);
    - multi-class: ``logits[c]`` is the mean of the top ``k`` instance logits of class ``c``
      (``k = 1``: the max over instances per class).

    ``attention`` is ``None``.

    Parameters
    ----------
    in_dim, num_classes, hidden_dim, dropout
        As :class:`AttentionMIL`.
    k : int
        Instances pooled (1 for max-MIL).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        hidden_dim: int = 128,
        dropout: float = 0.25,
        k: int = 1,
    ) -> None:
        super().__init__()
        self.in_dim = _check_int("in_dim", in_dim, 1)
        self.num_classes = _check_int("num_classes", num_classes, 2)
        hidden_dim = _check_int("hidden_dim", hidden_dim, 1)
        self.k = _check_int("k", k, 1)
        self.proj = _projection(in_dim, hidden_dim, _check_dropout(dropout))
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def forward(self, h: Tensor) -> MILOutput:
        """Pool one bag ``h`` : (N, D) → ``MILOutput(logits (C,), patch_logits (N, C), None)``."""
        _check_bag(h, self.in_dim)
        patch_logits = self.classifier(self.proj(h))
        k = min(self.k, patch_logits.shape[0])
        if self.num_classes == 2:
            margin = (patch_logits[:, 1] - patch_logits[:, 0]).float()
            logits = patch_logits[torch.topk(margin, k).indices].mean(dim=0)
        else:
            logits = torch.topk(patch_logits, k, dim=0).values.mean(dim=0)
        return MILOutput(logits, patch_logits, None)


class MeanMIL(nn.Module):
    """Mean pooling: ``logits = classifier(mean_i h'_i)``, ``patch_logits = classifier(h')``.

    Parameters
    ----------
    in_dim, num_classes, hidden_dim, dropout
        As :class:`AttentionMIL`.
    """

    def __init__(
        self, in_dim: int, num_classes: int, *, hidden_dim: int = 128, dropout: float = 0.25
    ) -> None:
        super().__init__()
        self.in_dim = _check_int("in_dim", in_dim, 1)
        self.num_classes = _check_int("num_classes", num_classes, 2)
        hidden_dim = _check_int("hidden_dim", hidden_dim, 1)
        self.proj = _projection(in_dim, hidden_dim, _check_dropout(dropout))
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def forward(self, h: Tensor) -> MILOutput:
        """Pool one bag ``h`` : (N, D) → ``MILOutput(logits (C,), patch_logits (N, C), None)``."""
        _check_bag(h, self.in_dim)
        hp = self.proj(h)
        return MILOutput(self.classifier(hp.mean(dim=0)), self.classifier(hp), None)


# ---------------------------------------------------------------------------------------------
# registered builders


def _build(
    make_head: Callable[[int], nn.Module],
    *,
    backbone: str | None,
    in_dim: int | None,
    backbone_weights: str | os.PathLike | None,
    grad_checkpoint: bool,
    chunk_size: int | None,
) -> MILModel:
    if backbone is None:
        if backbone_weights is not None:
            raise ConfigError("backbone_weights given but backbone is None (features mode)")
        if in_dim is None:
            raise ConfigError("features mode (backbone=None) needs in_dim, the feature size D")
        encoder, dim = None, _check_int("in_dim", in_dim, 1)
    else:
        encoder, dim = get_backbone(backbone, weights=backbone_weights)
        if in_dim is not None and in_dim != dim:
            raise ConfigError(f"in_dim={in_dim!r} does not match backbone {backbone!r} (D={dim})")
    return MILModel(encoder, make_head(dim), grad_checkpoint=grad_checkpoint, chunk_size=chunk_size)


_COMMON_DOC = """
    Parameters
    ----------
    num_classes : int
        ``C >= 2`` (binary is 2).
    backbone : str or None
        A registered backbone (end-to-end mode, input ``(N, 3, T, T)``), or ``None`` for features
        mode (input ``(N, in_dim)``).
    in_dim : int, optional
        Feature size ``D``; required without a backbone, checked against it otherwise.
    backbone_weights : str or path-like, optional
        State-dict file for the backbone (see ``load_backbone_weights``).
    hidden_dim : int
        Size of the projected instance embeddings.
    dropout : float
        Dropout after the projection.
    grad_checkpoint, chunk_size
        See :class:`~wsi_pipeline.models.MILModel`.
"""


@register_model("abmil")
def abmil(
    *,
    num_classes: int,
    backbone: str | None = "smallcnn",
    in_dim: int | None = None,
    backbone_weights: str | os.PathLike | None = None,
    hidden_dim: int = 128,
    attn_dim: int = 128,
    dropout: float = 0.25,
    grad_checkpoint: bool = False,
    chunk_size: int | None = None,
) -> MILModel:
    """Attention MIL (Ilse et al. 2018), plain attention; ``attn_dim`` sizes the attention layer."""
    return _build(
        lambda d: AttentionMIL(
            d, num_classes, hidden_dim=hidden_dim, attn_dim=attn_dim, dropout=dropout, gated=False
        ),
        backbone=backbone,
        in_dim=in_dim,
        backbone_weights=backbone_weights,
        grad_checkpoint=grad_checkpoint,
        chunk_size=chunk_size,
    )


@register_model("gated_abmil")
def gated_abmil(
    *,
    num_classes: int,
    backbone: str | None = "smallcnn",
    in_dim: int | None = None,
    backbone_weights: str | os.PathLike | None = None,
    hidden_dim: int = 128,
    attn_dim: int = 128,
    dropout: float = 0.25,
    grad_checkpoint: bool = False,
    chunk_size: int | None = None,
) -> MILModel:
    """Gated attention MIL (Ilse et al. 2018); ``attn_dim`` sizes the attention layers."""
    return _build(
        lambda d: AttentionMIL(
            d, num_classes, hidden_dim=hidden_dim, attn_dim=attn_dim, dropout=dropout, gated=True
        ),
        backbone=backbone,
        in_dim=in_dim,
        backbone_weights=backbone_weights,
        grad_checkpoint=grad_checkpoint,
        chunk_size=chunk_size,
    )


@register_model("clam_sb")
def clam_sb(
    *,
    num_classes: int,
    backbone: str | None = "smallcnn",
    in_dim: int | None = None,
    backbone_weights: str | os.PathLike | None = None,
    hidden_dim: int = 128,
    attn_dim: int = 128,
    dropout: float = 0.25,
    subtyping: bool = False,
    grad_checkpoint: bool = False,
    chunk_size: int | None = None,
) -> MILModel:
    """CLAM single branch (Lu et al. 2021): gated attention + per-class instance classifiers.

    Instance loss: ``model.head.instance_loss(h, label, k_sample=8)``; ``subtyping=True`` for
    mutually exclusive subtypes (see :class:`CLAMSingleBranch`); ``attn_dim`` sizes the attention.
    """
    return _build(
        lambda d: CLAMSingleBranch(
            d,
            num_classes,
            hidden_dim=hidden_dim,
            attn_dim=attn_dim,
            dropout=dropout,
            subtyping=subtyping,
        ),
        backbone=backbone,
        in_dim=in_dim,
        backbone_weights=backbone_weights,
        grad_checkpoint=grad_checkpoint,
        chunk_size=chunk_size,
    )


@register_model("maxmil")
def maxmil(
    *,
    num_classes: int,
    backbone: str | None = "smallcnn",
    in_dim: int | None = None,
    backbone_weights: str | os.PathLike | None = None,
    hidden_dim: int = 128,
    dropout: float = 0.25,
    grad_checkpoint: bool = False,
    chunk_size: int | None = None,
) -> MILModel:
    """Max-MIL (Campanella et al. 2019): slide logits are the top instance's logits."""
    return _build(
        lambda d: InstanceMIL(d, num_classes, hidden_dim=hidden_dim, dropout=dropout, k=1),
        backbone=backbone,
        in_dim=in_dim,
        backbone_weights=backbone_weights,
        grad_checkpoint=grad_checkpoint,
        chunk_size=chunk_size,
    )


@register_model("topk")
def topk(
    *,
    num_classes: int,
    backbone: str | None = "smallcnn",
    in_dim: int | None = None,
    backbone_weights: str | os.PathLike | None = None,
    hidden_dim: int = 128,
    dropout: float = 0.25,
    k: int = 5,
    grad_checkpoint: bool = False,
    chunk_size: int | None = None,
) -> MILModel:
    """Top-k MIL: slide logits are the mean logits of the top ``k`` instances (``k`` clipped to N)."""
    return _build(
        lambda d: InstanceMIL(d, num_classes, hidden_dim=hidden_dim, dropout=dropout, k=k),
        backbone=backbone,
        in_dim=in_dim,
        backbone_weights=backbone_weights,
        grad_checkpoint=grad_checkpoint,
        chunk_size=chunk_size,
    )


@register_model("meanmil")
def meanmil(
    *,
    num_classes: int,
    backbone: str | None = "smallcnn",
    in_dim: int | None = None,
    backbone_weights: str | os.PathLike | None = None,
    hidden_dim: int = 128,
    dropout: float = 0.25,
    grad_checkpoint: bool = False,
    chunk_size: int | None = None,
) -> MILModel:
    """Mean-pooling MIL: classifier on the mean projected instance embedding."""
    return _build(
        lambda d: MeanMIL(d, num_classes, hidden_dim=hidden_dim, dropout=dropout),
        backbone=backbone,
        in_dim=in_dim,
        backbone_weights=backbone_weights,
        grad_checkpoint=grad_checkpoint,
        chunk_size=chunk_size,
    )


for _builder in (abmil, gated_abmil, clam_sb, maxmil, topk, meanmil):
    _builder.__doc__ = (_builder.__doc__ or "") + "\n" + _COMMON_DOC
