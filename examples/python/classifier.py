"""A user's model code for kube-zerocopy's Python worker (examples/task-python.yaml).

The worker calls ``build`` once per process with the model's tensors, read-only views on the
store's shared mapping, and the device; what ``build`` returns runs each batch.
"""

from typing import Dict

import torch
from torch import nn

import kube_zerocopy


class Classifier(nn.Module):
    def __init__(self, features: int = 64, hidden: int = 256, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.LayerNorm(features), nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, classes)
        )

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {"output": self.body(batch["input"]).softmax(dim=-1)}


def build(weights: Dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    # Built without memory for the weights, which are then bound where they are mapped (on
    # cuda, `.to(device)` is their one copy to the GPU).
    with kube_zerocopy.empty_weights():
        model = Classifier()
    return kube_zerocopy.bind(model, weights).to(device)
