"""`bind` against the model the real weight server published (see test_store.py): a module
built on the meta device gets the mapped tensors themselves, tied weights stay tied, and weights
that do not fit the module are refused by name."""

import os
import unittest
from pathlib import Path
from typing import List

import torch
from torch import nn

from kube_zerocopy import bind, empty_weights, load_state_dict, resolve

MODEL = os.environ["KZC_TEST_MODEL"]
STORE = Path(os.environ["KZC_STORE"])


def layer_sizes(state: "dict[str, torch.Tensor]") -> List[int]:
    count = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    sizes = [state["layers.0.weight"].shape[1]]
    return sizes + [state[f"layers.{i}.weight"].shape[0] for i in range(count)]


class Mlp(nn.Module):
    def __init__(self, sizes: List[int], tied: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.tied = tied
        if tied:
            self.head = nn.Linear(sizes[1], sizes[0], bias=False)
            self.tie_weights()

    def tie_weights(self) -> None:
        if self.tied:
            self.head.weight = self.layers[0].weight


class Bind(unittest.TestCase):
    def setUp(self) -> None:
        self.weights = load_state_dict(MODEL)
        self.sizes = layer_sizes(self.weights)
        blob = STORE / "blobs" / resolve(MODEL) / "tensors.bin"
        # The mapping of the weights just loaded (the one that holds their first tensor).
        first = next(iter(self.weights.values())).data_ptr()
        for line in Path("/proc/self/maps").read_text().splitlines():
            if line.endswith(str(blob)):
                start, end = (int(a, 16) for a in line.split()[0].split("-"))
                if start <= first < end:
                    self.mapping = range(start, end)

    def test_a_module_built_on_meta_runs_on_the_mapped_tensors_themselves(self) -> None:
        with torch.device("meta"):
            model = Mlp(self.sizes)
        bind(model, self.weights)
        for name, p in model.named_parameters():
            self.assertIn(p.data_ptr(), self.mapping, name)
            self.assertEqual(p.data_ptr(), self.weights[name].data_ptr(), name)
        self.assertFalse(model.training)
        x = torch.randn(2, self.sizes[0])
        with torch.no_grad():
            expected = x
            for i in range(len(self.sizes) - 1):
                w, b = self.weights[f"layers.{i}.weight"], self.weights[f"layers.{i}.bias"]
                expected = torch.nn.functional.linear(expected, w, b)
            got = x
            for layer in model.layers:
                got = layer(got)
        torch.testing.assert_close(got, expected)

    def test_a_weight_the_file_leaves_out_as_tied_is_tied_again(self) -> None:
        with torch.device("meta"):
            model = Mlp(self.sizes, tied=True)
        bind(model, self.weights)
        self.assertIs(model.head.weight, model.layers[0].weight)
        self.assertIn(model.head.weight.data_ptr(), self.mapping)

    def test_weights_that_do_not_fit_the_module_are_refused_by_name(self) -> None:
        with torch.device("meta"):
            shorter = Mlp(self.sizes[:-1])
        last = f"layers.{len(self.sizes) - 2}.weight"
        with self.assertRaisesRegex(KeyError, last):
            bind(shorter, self.weights)

        class Untied(Mlp):
            def tie_weights(self) -> None:
                pass

        with torch.device("meta"):
            untied = Untied(self.sizes, tied=True)
        with self.assertRaisesRegex(KeyError, "head.weight"):
            bind(untied, self.weights)

    def test_buffers_a_module_computes_keep_their_values_with_empty_weights(self) -> None:
        class Scaled(Mlp):
            def __init__(self, sizes: List[int]) -> None:
                super().__init__(sizes)
                self.register_buffer("scale", torch.full((sizes[0],), 2.0), persistent=False)

        # Built on the meta device, the buffer has no value: refused by name, not run.
        with torch.device("meta"):
            on_meta = Scaled(self.sizes)
        with self.assertRaisesRegex(KeyError, "scale"):
            bind(on_meta, self.weights)
        with empty_weights():
            model = Scaled(self.sizes)
        self.assertTrue(all(p.is_meta for p in model.parameters()))
        bind(model, self.weights)
        self.assertTrue(torch.equal(model.scale, torch.full((self.sizes[0],), 2.0)))
        for name, p in model.named_parameters():
            self.assertIn(p.data_ptr(), self.mapping, name)


if __name__ == "__main__":
    unittest.main()
