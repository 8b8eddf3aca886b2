"""Binding mapped tensors to a ``torch.nn.Module`` without copying them."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, TypeVar

if TYPE_CHECKING:
    import torch

M = TypeVar("M", bound="torch.nn.Module")


@contextmanager
def empty_weights() -> Iterator[None]:
    """Modules built inside have their parameters on the meta device, and their buffers as
    usual: no memory and no initialisation for the weights that :func:`bind` gives them, while
    a buffer computed from the config (rotary frequencies, position ids, masks), which no
    state dict holds, keeps its value. ``with torch.device("meta")`` would leave such buffers
    without values.

    A parameter is moved to the meta device as it is registered, before the module initialises
    it: the memory its constructor asked for was never written, and is given back at once.
    """
    import torch

    register = torch.nn.Module.register_parameter

    def register_on_meta(
        module: "torch.nn.Module", name: str, param: Optional["torch.nn.Parameter"]
    ) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = torch.nn.Parameter(
                param.to("meta"), requires_grad=param.requires_grad
            )

    setattr(torch.nn.Module, "register_parameter", register_on_meta)
    try:
        yield
    finally:
        setattr(torch.nn.Module, "register_parameter", register)


def bind(module: M, weights: Mapping[str, "torch.Tensor"], *, strict: bool = True) -> M:
    """Binds ``weights`` (from :func:`kube_zerocopy.load_state_dict`) to ``module`` as its
    parameters and buffers, without a copy, and returns it in eval mode.

    Build the module inside :func:`empty_weights` (``with kube_zerocopy.empty_weights(): model
    = Net(config)``) so that nothing is allocated or initialised for weights that the mapping
    holds already; the tensors are then assigned, not copied (``load_state_dict(...,
    assign=True)``), so the module takes the file's dtypes (cast the batches to them). Weights
    the file leaves out because they are tied to another (a language model's output layer and
    its embedding) are tied again through the module's ``tie_weights()`` where it has one.
    Parameters stay read-only: training or changing them in place faults.

    Refused by name (``KeyError``): anything left on the meta device; with ``strict``, also a
    weight the module lacks and a parameter the file does not fill.
    """
    missing, unexpected = module.load_state_dict(dict(weights), strict=False, assign=True)
    tie = getattr(module, "tie_weights", None)
    # Tie only what the file left out: tying would replace a weight the file holds.
    if missing and callable(tie):
        tie()
    if strict and unexpected:
        raise KeyError(f"the module has no {sorted(unexpected)}, which the weights hold")
    # A name the file left out is bound only if tying made it one of the mapped tensors.
    mapped = {t.untyped_storage().data_ptr() for t in weights.values()}
    state = module.state_dict(keep_vars=True)
    unbound = [
        name
        for name in missing
        if name in state
        and not state[name].is_meta
        and state[name].untyped_storage().data_ptr() not in mapped
    ]
    # Parameters and buffers still on the meta device have no values, the non-persistent
    # buffers (which no state dict holds) among them.
    on_meta = [n for n, p in module.named_parameters(remove_duplicate=False) if p.is_meta]
    on_meta += [n for n, b in module.named_buffers(remove_duplicate=False) if b.is_meta]
    if on_meta or (strict and unbound):
        raise KeyError(
            f"the weights leave {sorted(set(on_meta + unbound))} without values: publish them, "
            "or build the module inside kube_zerocopy.empty_weights() (not torch.device('meta')) "
            "so that the buffers it computes itself keep their values"
        )
    return module.eval()
