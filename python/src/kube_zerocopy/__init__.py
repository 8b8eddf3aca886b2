"""Map models published by kube-zerocopy into read-only torch tensors, without a copy."""

from kube_zerocopy.modules import bind, empty_weights
from kube_zerocopy.store import (
    LayoutError,
    Manifest,
    TensorEntry,
    load_state_dict,
    open_manifest,
    resolve,
)

__all__ = [
    "LayoutError",
    "Manifest",
    "TensorEntry",
    "bind",
    "empty_weights",
    "load_state_dict",
    "open_manifest",
    "resolve",
]
