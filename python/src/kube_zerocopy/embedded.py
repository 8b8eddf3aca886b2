"""What the Python worker calls in its embedded interpreter: build the user's model from its
mapped weights once, then run batches. Tensors cross between the worker and torch as DLPack
capsules, so a batch and its answer are the same memory on both sides, never copied.

The user's entry point (``module:callable``) is called once as ``callable(weights, device)``,
``weights`` the model's tensors by name, read-only views on the store's mapping. It returns what
runs a batch: called with ``{"input": tensor}``, it answers a tensor, or ``{"output": tensor}``.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Tuple

import torch

from kube_zerocopy.store import load_state_dict

INPUT = "input"
OUTPUT = "output"

# The worker's output is a pipe in a pod: the user's prints reach the log line by line, not
# when a buffer fills (the interpreter is never finalised to flush one).
for _stream in (sys.stdout, sys.stderr):
    reconfigure = getattr(_stream, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(line_buffering=True)


@dataclass
class Model:
    """A built model: what runs a batch, and the weights it was given."""

    entry_point: str
    run: Callable[[Dict[str, torch.Tensor]], Any]
    weights: Mapping[str, torch.Tensor]


def _load_entry_point(entry_point: str) -> Callable[..., Any]:
    module_name, sep, attribute = entry_point.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"entry point {entry_point!r} is not module:callable")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise AttributeError(
                f"entry point {entry_point!r}: module {module_name!r} has no {attribute!r}"
            ) from None
    if not callable(target):
        raise TypeError(f"entry point {entry_point!r} is not callable")
    return target  # type: ignore[no-any-return]


def build(entry_point: str, digest: str, store: str, device: str) -> Model:
    """Maps the published model ``digest`` in ``store`` and builds it with the user's code."""
    factory = _load_entry_point(entry_point)
    weights = load_state_dict(digest=digest, store=store)
    with torch.no_grad():
        run = factory(weights, torch.device(device))
    if not callable(run):
        raise TypeError(
            f"entry point {entry_point!r} returned {type(run).__name__}, not something that "
            "runs a batch (a module or a function of {'input': tensor})"
        )
    if isinstance(run, torch.nn.Module):
        run.eval()
    return Model(entry_point, run, weights)


def forward(model: Model, batch: Any) -> Any:
    """Runs one batch (a DLPack capsule) and answers the output as a DLPack capsule."""
    x = torch.from_dlpack(batch)
    with torch.no_grad():
        out = model.run({INPUT: x})
    if isinstance(out, Mapping):
        if OUTPUT not in out:
            raise KeyError(
                f"{model.entry_point}: the answer names {sorted(out)}, and the pipeline reads "
                f"{OUTPUT!r}"
            )
        out = out[OUTPUT]
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"{model.entry_point}: a batch's answer is {type(out).__name__}; answer a tensor or "
            f"{{{OUTPUT!r}: tensor}}"
        )
    return torch.utils.dlpack.to_dlpack(out.detach())


def tensors(model: Model) -> List[Tuple[str, Any]]:
    """The weights the model runs with (its state dict when it is a module, tied weights under
    each name; else the weights it was given), each a DLPack capsule: where they lie shows
    there was no copy. Buffers the module computes itself are not weights."""
    if isinstance(model.run, torch.nn.Module):
        named = dict(model.run.state_dict(keep_vars=True))
    else:
        named = dict(model.weights)
    return [(name, torch.utils.dlpack.to_dlpack(t.detach())) for name, t in named.items()]
