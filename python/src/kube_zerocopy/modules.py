"""Binding mapped tensors to a ``torch.nn.Module`` without copying them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, TypeVar

if TYPE_CHECKING:
    import torch

M = TypeVar("M", bound="torch.nn.Module")


def bind(module: M, weights: Mapping[str, "torch.Tensor"], *, strict: bool = True) -> M:
    """Binds ``weights`` (from :func:`kube_zerocopy.load_state_dict`) to ``module`` as its
    parameters and buffers, without a copy, and returns it in eval mode.

    Build the module on the meta device (``with torch.device("meta"): model = Net(config)``) so
    that nothing is allocated or initialised for weights that the mapping holds already; the
    tensors are then assigned, not copied (``load_state_dict(..., assign=True)``). Weights the
    file leaves out because they are tied to another (a language model's output layer and its
    embedding) are tied again through the module's ``tie_weights()`` where it has one.
    Parameters stay read-only: training or changing them in place faults.
    """
    missing, unexpected = module.load_state_dict(dict(weights), strict=False, assign=True)
    tie = getattr(module, "tie_weights", None)
    if callable(tie):
        tie()
    if strict and unexpected:
        raise KeyError(f"the module has no {sorted(unexpected)}, which the weights hold")
    # A name the file left out is bound only if tying made it one of the mapped tensors.
    mapped = {t.untyped_storage().data_ptr() for t in weights.values()}
    state = module.state_dict(keep_vars=True)
    on_meta = [name for name, value in state.items() if value.is_meta]
    unbound = [
        name
        for name in missing
        if name in state
        and not state[name].is_meta
        and state[name].untyped_storage().data_ptr() not in mapped
    ]
    if on_meta or (strict and unbound):
        raise KeyError(
            f"the weights leave {sorted(on_meta + unbound)} without values: publish them, or tie "
            "or create them in the module's own code"
        )
    return module.eval()
