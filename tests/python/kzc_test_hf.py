"""A Hugging Face model as a user brings it: a checkpoint folder that `save_pretrained` wrote
(config.json and model.safetensors, the output layer left out because it is tied to the token
embedding), built with transformers' own classes and bound to the mapped weights.

Run as a script, it writes what the tests compare against, computed by transformers itself:
``python kzc_test_hf.py <folder>`` writes ``checkpoint/`` (a tiny GPT-2 with seeded weights),
``input.safetensors`` (token ids) and ``reference.safetensors`` (the last token's logits).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import kube_zerocopy

ROWS, SEQ = 4, 12
# Where the checkpoint's config is: baked into the user's image, named here by the test.
CHECKPOINT_ENV = "KZC_TEST_CHECKPOINT"


class LastTokenLogits(nn.Module):
    """Runs a batch of token ids; answers each row's next-token logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        logits = self.model(input_ids=batch["input"]).logits
        return {"output": logits[:, -1, :]}


def build(weights: Dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """The entry point: transformers builds the model from its config, with no memory for the
    weights, which are then the mapped ones (the tied output layer among them)."""
    config = AutoConfig.from_pretrained(os.environ[CHECKPOINT_ENV])
    with kube_zerocopy.empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return LastTokenLogits(kube_zerocopy.bind(model, weights)).to(device)


def main(folder: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(11)
    config = GPT2Config(
        vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder / "checkpoint", safe_serialization=True)
    ids = torch.randint(0, config.vocab_size, (ROWS, SEQ), dtype=torch.int64)
    save_file({"input": ids}, str(folder / "input.safetensors"))
    with torch.no_grad():
        reference = model(input_ids=ids).logits[:, -1, :].contiguous()
    save_file({"output": reference}, str(folder / "reference.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
