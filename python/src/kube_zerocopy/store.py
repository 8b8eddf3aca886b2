"""The store's layout, as kube-zerocopy's weight server and node agent write it, read here.

A published model is a folder named by its digest::

    <store>/blobs/<sha256>/manifest.json   what is in tensors.bin, and where
    <store>/blobs/<sha256>/tensors.bin     every tensor at a 64-byte aligned offset
    <bindings>/ready.json                  model name -> digest, for one pod

A folder is published by one atomic rename and never changes afterwards, so a mapping of its
``tensors.bin`` stays valid for as long as the process holds it.
"""

from __future__ import annotations

import json
import mmap
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

if TYPE_CHECKING:
    import torch

LAYOUT_VERSION = 1
ALIGNMENT = 64
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "tensors.bin"
READY_FILE = "ready.json"
# What the operator sets in a pipeline's containers (the contract crate's names).
STORE_ENV = "KZC_STORE"
BINDINGS_ENV = "KZC_BINDINGS"
DEFAULT_STORE = "/kzc/store"
DEFAULT_BINDINGS = "/kzc/bindings"

# The layout's dtypes, with their sizes in bytes.
DTYPE_SIZES: Dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "Bool": 1,
}

PathLike = Union[str, "os.PathLike[str]"]


class LayoutError(ValueError):
    """A model folder, manifest or bindings file that does not follow the layout."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a model: where it lies in ``tensors.bin``."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    offset: int
    length: int


@dataclass(frozen=True)
class Manifest:
    """What a published model's ``tensors.bin`` holds."""

    digest: str
    format: str
    tensors_bytes: int
    tensors: Tuple[TensorEntry, ...]
    folder: Path


def _store(store: Optional[PathLike]) -> Path:
    return Path(store if store is not None else os.environ.get(STORE_ENV, DEFAULT_STORE))


def _bindings(bindings: Optional[PathLike]) -> Path:
    return Path(
        bindings if bindings is not None else os.environ.get(BINDINGS_ENV, DEFAULT_BINDINGS)
    )


def resolve(name: str, bindings: Optional[PathLike] = None) -> str:
    """The digest a model name is bound to in a pod's ``ready.json``.

    Raises FileNotFoundError while the weights are not ready (no ``ready.json`` yet), and
    LookupError for a name that is not among the published models.
    """
    path = _bindings(bindings) / READY_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"the weights are not ready: {path} does not exist") from None
    try:
        digests = json.loads(text)
    except json.JSONDecodeError as e:
        raise LayoutError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise LayoutError(f"{path} is not a map of model names to digests")
    if name not in digests:
        known = ", ".join(sorted(digests)) or "none"
        raise LookupError(f"model {name!r} is not among the published models ({known})")
    digest: str = digests[name]
    return digest


def _is_digest(digest: str) -> bool:
    return len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


def open_manifest(digest: str, store: Optional[PathLike] = None) -> Manifest:
    """A published model's manifest, checked as the workers check it: the supported layout
    version, every tensor aligned, in bounds, not overlapping, its length its shape's."""
    if not _is_digest(digest):
        raise LayoutError(f"{digest!r} is not a sha256 digest (64 lowercase hex digits)")
    folder = _store(store) / "blobs" / digest
    path = folder / MANIFEST_FILE
    try:
        raw: Any = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"model {digest} is not published in {folder.parent}") from None
    except json.JSONDecodeError as e:
        raise LayoutError(f"{path} is not valid JSON: {e}") from None
    try:
        manifest = _parse(raw, folder)
    except LayoutError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise LayoutError(f"{path} does not follow the layout: {e!r}") from None
    _check(manifest, (folder / TENSORS_FILE).stat().st_size)
    return manifest


def _parse(raw: Dict[str, Any], folder: Path) -> Manifest:
    version = raw["layout_version"]
    if version != LAYOUT_VERSION:
        raise LayoutError(f"layout version {version} is not the supported {LAYOUT_VERSION}")
    entries = raw["tensors"]
    if not isinstance(entries, list):
        raise LayoutError("the manifest's tensors are not a list")
    tensors: List[TensorEntry] = []
    for e in entries:
        dims = e["shape"]
        if not isinstance(dims, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in dims
        ):
            raise LayoutError(
                f"tensor {e['name']!r}: its shape does not follow the layout (a list of integers)"
            )
        shape = tuple(dims)
        if e["dtype"] not in DTYPE_SIZES:
            raise LayoutError(f"tensor {e['name']!r} has the unknown dtype {e['dtype']!r}")
        tensors.append(
            TensorEntry(str(e["name"]), str(e["dtype"]), shape, int(e["offset"]), int(e["length"]))
        )
    if raw["digest"] != folder.name:
        raise LayoutError(f"the manifest names model {raw['digest']!r}, its folder {folder.name}")
    return Manifest(
        digest=str(raw["digest"]),
        format=str(raw["format"]),
        tensors_bytes=int(raw["tensors_bytes"]),
        tensors=tuple(tensors),
        folder=folder,
    )


def _check(manifest: Manifest, file_bytes: int) -> None:
    if file_bytes != manifest.tensors_bytes:
        raise LayoutError(
            f"{TENSORS_FILE} holds {file_bytes} bytes, the manifest says {manifest.tensors_bytes}"
        )
    names = set()
    end_of_previous = 0
    for t in sorted(manifest.tensors, key=lambda t: t.offset):
        if t.name in names:
            raise LayoutError(f"tensor {t.name!r} is listed twice")
        names.add(t.name)
        if t.offset < 0 or t.offset % ALIGNMENT != 0:
            raise LayoutError(f"tensor {t.name!r} starts at unaligned offset {t.offset}")
        expected = DTYPE_SIZES[t.dtype]
        for d in t.shape:
            if d < 0:
                raise LayoutError(f"tensor {t.name!r} has a negative dimension")
            expected *= d
        if expected != t.length:
            raise LayoutError(
                f"tensor {t.name!r}: length {t.length} does not match its shape and dtype"
            )
        if t.offset < end_of_previous:
            raise LayoutError(f"tensor {t.name!r} overlaps the tensor before it")
        end_of_previous = t.offset + t.length
        if end_of_previous > manifest.tensors_bytes:
            raise LayoutError(f"tensor {t.name!r} runs past the end of {TENSORS_FILE}")


def _torch_dtype(dtype: str) -> "torch.dtype":
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "Bool": torch.bool,
    }[dtype]


def load_state_dict(
    name: Optional[str] = None,
    *,
    digest: Optional[str] = None,
    store: Optional[PathLike] = None,
    bindings: Optional[PathLike] = None,
) -> Dict[str, "torch.Tensor"]:
    """A published model's tensors by name, each a read-only view on one mapping of its
    ``tensors.bin``: nothing is copied, and every process that maps the model shares its pages.

    Name the model as the pipeline does (resolved through the pod's ``ready.json``), or give its
    ``digest``. ``store`` and ``bindings`` default to ``KZC_STORE`` and ``KZC_BINDINGS``, which
    the operator sets in a pipeline's containers (``/kzc/store`` and ``/kzc/bindings``).

    Writing to a tensor faults (the mapping is read-only): clone one to change it. Bind the
    tensors to a module built on the meta device with ``module.load_state_dict(state,
    assign=True)``.
    """
    import torch

    if (name is None) == (digest is None):
        raise TypeError("give a model name or a digest (one of the two)")
    if digest is None:
        assert name is not None
        digest = resolve(name, bindings)
    manifest = open_manifest(digest, store)
    if manifest.format != "Safetensors":
        raise LayoutError(
            f"model {digest} is {manifest.format}: its tensors are the archive's storages, not a "
            "state dict (load TorchScript with torch.jit.load)"
        )
    state: Dict[str, torch.Tensor] = {}
    if manifest.tensors_bytes == 0:
        for t in manifest.tensors:
            state[t.name] = torch.empty(t.shape, dtype=_torch_dtype(t.dtype))
        return state
    with open(manifest.folder / TENSORS_FILE, "rb") as file:
        # Read-only and shared: a write faults instead of changing every worker's weights.
        mapping = mmap.mmap(file.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    with warnings.catch_warnings():
        # torch warns that the buffer is not writable: that is the point.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        whole = torch.frombuffer(mapping, dtype=torch.uint8)
    for t in manifest.tensors:
        view = whole[t.offset : t.offset + t.length]
        state[t.name] = view.view(_torch_dtype(t.dtype)).reshape(t.shape)
    return state
