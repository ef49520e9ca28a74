"""Which rule answers for which module type.

`RULES` maps a layer class to its fused rule; a module matches only if its class is
exactly that class or a subclass that does not override forward. Everything else with
moving tensors of its own takes the generic path. Register a new layer type with
`register_rule(cls, rule)`.
"""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mlifast.multipoint import layers
from mlifast.multipoint.attention import MultiheadAttentionRule
from mlifast.multipoint.generic import GenericRule, RecurrentRule
from mlifast.multipoint.rule import MultiPointRule, forward_is_inherited

RULES: dict[type, type[MultiPointRule]] = {
    nn.Linear: layers.LinearRule,
    nn.Bilinear: GenericRule,
    nn.Conv1d: layers.ConvRule,
    nn.Conv2d: layers.ConvRule,
    nn.Conv3d: layers.ConvRule,
    nn.ConvTranspose1d: layers.AffineInParamsRule,
    nn.ConvTranspose2d: layers.AffineInParamsRule,
    nn.ConvTranspose3d: layers.AffineInParamsRule,
    nn.Embedding: layers.EmbeddingRule,
    nn.LayerNorm: layers.LayerNormRule,
    nn.GroupNorm: layers.GroupNormRule,
    nn.BatchNorm1d: layers.BatchNormRule,
    nn.BatchNorm2d: layers.BatchNormRule,
    nn.BatchNorm3d: layers.BatchNormRule,
    nn.MultiheadAttention: MultiheadAttentionRule,
    nn.RNN: RecurrentRule,
    nn.LSTM: RecurrentRule,
    nn.GRU: RecurrentRule,
}
if hasattr(nn, "RMSNorm"):
    RULES[nn.RMSNorm] = layers.RMSNormRule

# Rules for classes of optional libraries, matched by qualified name so that mlifast
# never imports those libraries itself.
RULES_BY_NAME: dict[str, type[MultiPointRule]] = {
    "transformers.pytorch_utils.Conv1D": layers.HFConv1DRule,
}


def register_rule(cls: type, rule: type[MultiPointRule]) -> None:
    """Make `rule` answer for modules of class `cls` (and subclasses keeping its forward)."""
    RULES[cls] = rule


def rule_for(module: nn.Module) -> type[MultiPointRule]:
    """The fused rule of module's class, else the generic one (which runs the module's
    own forward)."""
    return GenericRule if generic_instead(module) else _class_rule(module)


def generic_instead(module: nn.Module) -> bool:
    """Whether a module of a fused class takes the generic rule: its weights computed
    before use, out of the fused rule's sight (`computes_its_weights`). Batch norm keeps
    its rule (check_supported refuses it so), the only one that follows the bn policies."""
    return (computes_its_weights(module) and not isinstance(module, _BatchNorm)
            and not issubclass(_class_rule(module), GenericRule))


def computes_its_weights(module: nn.Module) -> bool:
    """Parametrized (torch.nn.utils.parametrize: weight and spectral norm, a softplus of a
    raw scale), or holding a tensor attribute of its own that a hook sets (the deprecated
    weight_norm and spectral_norm)."""
    return is_parametrized(module) or any(isinstance(v, Tensor) for v in vars(module).values())


def is_parametrized(module: nn.Module) -> bool:
    """parametrize.is_parametrized(module), without its attribute lookup (an exception
    inside nn.Module.__getattr__ for every plain module: 1 ms a call on 250 modules)."""
    return isinstance(module._modules.get("parametrizations"), nn.ModuleDict)


def _class_rule(module: nn.Module) -> type[MultiPointRule]:
    for cls in type(module).__mro__:
        if cls in RULES and forward_is_inherited(module, cls):
            return RULES[cls]
        rule = RULES_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None and type(module).forward is cls.forward:
            return rule
    return GenericRule


def check_supported(module: nn.Module, path: str) -> None:
    """Refuse configurations a rule cannot reproduce, before anything runs."""
    if isinstance(module, _BatchNorm) and computes_its_weights(module):
        raise NotImplementedError(
            f"mlifast: batch norm '{path}' computes its weight or bias before use (a parametrization, or "
            "the deprecated weight_norm), which mlifast's batch-norm rule cannot follow; remove it to "
            "interpolate this model"
        )
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        raise NotImplementedError(
            f"mlifast: Embedding '{path}' has max_norm, which rewrites its weight during "
            "forward; build the model with max_norm=None to interpolate it"
        )
