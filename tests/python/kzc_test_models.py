"""A user's model code, as the Python worker's tests run it: a small attention block with a
tied pair of weights and a buffer it computes itself (no state dict holds it), built without
memory for its weights and bound to the mapped ones.

Run as a script, it writes what the tests compare against, computed by plain PyTorch (the
ordinary, copying way): ``python kzc_test_models.py <folder>`` writes ``block.safetensors``
(the seeded weights, the tied copy left out as Hugging Face leaves it out), ``input.safetensors``
and ``reference.safetensors``; with ``wide`` after the folder, the same for a 256 MiB module
(``wide*.safetensors``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict

import torch
from torch import nn

import kube_zerocopy

SEQ, DIM, HEADS, ROWS = 4, 16, 2, 6


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.attention = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.up = nn.Linear(DIM, 4 * DIM)
        self.down = nn.Linear(4 * DIM, DIM)
        self.encode = nn.Linear(DIM, DIM, bias=False)
        self.decode = nn.Linear(DIM, DIM, bias=False)
        self.register_buffer("scale", torch.ones(DIM))
        # Computed from the config, as rotary frequencies are: not in the file.
        self.register_buffer("positions", torch.linspace(0.5, 1.5, SEQ).reshape(SEQ, 1), persistent=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        self.decode.weight = self.encode.weight

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        x = batch["input"].reshape(-1, SEQ, DIM) * self.positions
        h = self.norm(x)
        h = x + self.attention(h, h, h, need_weights=False)[0]
        h = h + self.down(nn.functional.gelu(self.up(h)))
        y = self.decode(torch.tanh(self.encode(h))) * self.scale
        return {"output": y.mean(dim=1)}


def build(weights: Dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """The entry point: nothing allocated for the weights, which stay where they are mapped."""
    with kube_zerocopy.empty_weights():
        block = Block()
    return kube_zerocopy.bind(block, weights).to(device)


class Wide(nn.Module):
    """Large enough weights (256 MiB) for memory to show whether they were copied."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(WIDE_IN, WIDE_HIDDEN)
        self.down = nn.Linear(WIDE_HIDDEN, 16)

    def forward(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.down(torch.relu(self.up(batch["input"])))


WIDE_IN, WIDE_HIDDEN = 4096, 16384


def build_wide(weights: Dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    with kube_zerocopy.empty_weights():
        wide = Wide()
    return kube_zerocopy.bind(wide, weights).to(device)


def build_wide_copying(weights: Dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """The ordinary way, for comparison: the module holds its own copy of the weights."""
    wide = Wide()
    wide.load_state_dict(weights)
    return wide.eval().to(device)


def answers_a_tuple(weights: Dict[str, torch.Tensor], device: torch.device) -> object:
    """A model whose batches answer a tuple, which the pipeline cannot read."""
    return lambda batch: (batch["input"], batch["input"])


def main_wide(folder: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(5)
    wide = Wide().eval()
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(folder / "wide.safetensors"))
    x = torch.randn(ROWS, WIDE_IN)
    save_file({"input": x}, str(folder / "wide-input.safetensors"))
    with torch.no_grad():
        save_file({"output": wide({"input": x})}, str(folder / "wide-reference.safetensors"))


def main(folder: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(7)
    block = Block().eval()
    with torch.no_grad():
        block.scale.uniform_(0.5, 1.5)
    state = {k: v.contiguous() for k, v in block.state_dict().items() if k != "decode.weight"}
    save_file(state, str(folder / "block.safetensors"))
    x = torch.randn(ROWS, SEQ * DIM)
    save_file({"input": x}, str(folder / "input.safetensors"))
    with torch.no_grad():
        save_file({"output": block({"input": x})["output"]}, str(folder / "reference.safetensors"))


if __name__ == "__main__":
    if sys.argv[2:] == ["wide"]:
        main_wide(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]))
