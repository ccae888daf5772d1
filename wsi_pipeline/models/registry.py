"""Registry mechanics: name → builder, for MIL models and patch backbones.

Builders register themselves with :func:`register_model` / :func:`register_backbone` when
:mod:`wsi_pipeline.models` is imported; :func:`get_model` and :func:`get_backbone` (in
:mod:`wsi_pipeline.models.backbones`) look them up by name. Every builder has an explicit
keyword-only signature; :func:`get_model` checks the options against it and raises
:class:`~wsi_pipeline.errors.ConfigError` naming what is wrong, so a typo in a pipeline file fails
with a one-line message instead of a ``TypeError`` deep inside a builder.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ConfigError

if TYPE_CHECKING:
    from .mil import MILModel

__all__ = [
    "backbone_builder",
    "backbone_torchvision_arch",
    "get_model",
    "list_backbones",
    "list_models",
    "model_options",
    "register_backbone",
    "register_model",
]

F = TypeVar("F", bound=Callable[..., Any])

_MODELS: dict[str, Callable[..., Any]] = {}
_BACKBONES: dict[str, Callable[..., Any]] = {}
_TORCHVISION: dict[str, str] = {}  # backbone name -> torchvision architecture of its weights


def _register(table: dict[str, Callable[..., Any]], kind: str, name: str) -> Callable[[F], F]:
    def decorator(fn: F) -> F:
        if name in table:
            raise ValueError(f"{kind} {name!r} is already registered")
        table[name] = fn
        return fn

    return decorator


def register_model(name: str) -> Callable[[F], F]:
    """Register a MIL model builder under ``name``.

    The builder takes keyword-only options (at least ``num_classes``) and returns a
    :class:`~wsi_pipeline.models.MILModel`.
    """
    return _register(_MODELS, "model", name)


def register_backbone(name: str, *, torchvision: str | None = None) -> Callable[[F], F]:
    """Register a patch-backbone builder under ``name``.

    The builder takes no arguments and returns ``(module, dim)``: a randomly initialised module
    mapping normalised images ``(N, 3, T, T)`` to embeddings ``(N, dim)``.

    Parameters
    ----------
    name : str
    torchvision : str, optional
        The torchvision architecture whose weights fit the module (``"resnet50"``): its weights
        names (``"IMAGENET1K_V2"``) are then accepted as ``weights``.
    """
    register = _register(_BACKBONES, "backbone", name)

    def decorator(fn: F) -> F:
        register(fn)
        if torchvision is not None:
            _TORCHVISION[name] = torchvision
        return fn

    return decorator


def list_models() -> list[str]:
    """Names of the registered MIL models, sorted."""
    return sorted(_MODELS)


def list_backbones() -> list[str]:
    """Names of the registered patch backbones, sorted."""
    return sorted(_BACKBONES)


def _lookup(table: dict[str, Callable[..., Any]], kind: str, name: str) -> Callable[..., Any]:
    try:
        return table[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(table))
        raise ConfigError(f"unknown {kind} {name!r}; known {kind}s: {known}") from None


def model_options(name: str) -> dict[str, Any]:
    """Options of a registered model builder and their defaults.

    Required options map to :data:`inspect.Parameter.empty`.

    Raises
    ------
    ConfigError
        ``name`` is not registered.
    """
    builder = _lookup(_MODELS, "model", name)
    return {p.name: p.default for p in inspect.signature(builder).parameters.values()}


def get_model(name: str, /, **options: Any) -> MILModel:
    """Build the registered MIL model ``name`` with ``options``.

    Parameters
    ----------
    name : str
        One of :func:`list_models`.
    **options
        Keyword options of that builder (see :func:`model_options`). Every builder accepts
        ``num_classes`` (required), ``backbone``, ``in_dim``, ``backbone_weights``, ``hidden_dim``,
        ``dropout``, ``grad_checkpoint`` and ``chunk_size``; some add their own (``k`` for
        ``"topk"``, ``attn_dim`` for the attention heads, ``subtyping`` for ``"clam_sb"``).

    Returns
    -------
    MILModel

    Raises
    ------
    ConfigError
        Unknown model name, unknown or missing option, or an invalid option value.
    TrainingError
        ``backbone_weights`` cannot be loaded.
    """
    builder = _lookup(_MODELS, "model", name)
    params = inspect.signature(builder).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ConfigError(
            f"model {name!r} has no option(s) {', '.join(map(repr, unknown))}; "
            f"options: {', '.join(params)}"
        )
    missing = [
        p.name
        for p in params.values()
        if p.default is inspect.Parameter.empty and p.name not in options
    ]
    if missing:
        raise ConfigError(f"model {name!r} needs option(s) {', '.join(map(repr, missing))}")
    return builder(**options)


def backbone_torchvision_arch(name: str) -> str | None:
    """The torchvision architecture registered for backbone ``name`` (None if it has none).

    Raises
    ------
    ConfigError
        ``name`` is not registered (names the known backbones).
    """
    _lookup(_BACKBONES, "backbone", name)
    return _TORCHVISION.get(name)


def backbone_builder(name: str) -> Callable[..., Any]:
    """The builder registered as backbone ``name`` (see :func:`register_backbone`).

    Raises
    ------
    ConfigError
        ``name`` is not registered (names the known backbones).
    """
    return _lookup(_BACKBONES, "backbone", name)
