"""The package against a model the real weight server published.

Run by the workspace's test `python_package.rs`, which publishes the model and sets:
KZC_STORE and KZC_BINDINGS (the store), KZC_TEST_MODEL (the model's name) and
KZC_TEST_REFERENCE (its safetensors file, read by the safetensors package as the reference).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import torch
from safetensors.torch import load_file

from kube_zerocopy import LayoutError, load_state_dict, resolve
from kube_zerocopy.store import MANIFEST_FILE, TENSORS_FILE

MODEL = os.environ["KZC_TEST_MODEL"]
REFERENCE = os.environ["KZC_TEST_REFERENCE"]
STORE = Path(os.environ["KZC_STORE"])


def mapping_of(path: Path) -> "tuple[int, int]":
    """The address range of this process's mapping of `path`."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            start, end = (int(a, 16) for a in fields[0].split("-"))
            return start, end
    raise AssertionError(f"{path} is not mapped")


def anonymous_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1])
    raise AssertionError("no Anonymous line")


class LoadStateDict(unittest.TestCase):
    def test_tensors_equal_what_safetensors_reads_from_the_file(self) -> None:
        state = load_state_dict(MODEL)
        reference = load_file(REFERENCE)
        self.assertEqual(sorted(state), sorted(reference))
        for name, tensor in reference.items():
            self.assertEqual(state[name].dtype, tensor.dtype, name)
            self.assertEqual(state[name].shape, tensor.shape, name)
            self.assertTrue(torch.equal(state[name], tensor), name)

    def test_every_tensor_is_a_view_on_one_read_only_mapping(self) -> None:
        before = anonymous_kib()
        state = load_state_dict(MODEL)
        grown = anonymous_kib() - before
        digest = resolve(MODEL)
        path = STORE / "blobs" / digest / TENSORS_FILE
        start, end = mapping_of(path)
        total = 0
        for name, tensor in state.items():
            pointer = tensor.data_ptr()
            self.assertTrue(start <= pointer and pointer + tensor.nbytes <= end, name)
            total += tensor.nbytes
        # The weights are in the mapping, not in the process's own memory.
        self.assertGreater(total, 8 << 20)
        self.assertLess(grown * 1024, total // 10, f"anonymous memory grew {grown} KiB")
        permissions = next(
            line.split()[1]
            for line in Path("/proc/self/maps").read_text().splitlines()
            if line.endswith(str(path))
        )
        self.assertEqual(permissions[:2], "r-", permissions)

    def test_a_write_to_the_weights_faults(self) -> None:
        code = (
            "from kube_zerocopy import load_state_dict\n"
            f"state = load_state_dict({MODEL!r})\n"
            "next(iter(state.values())).add_(1)\n"
            "print('written')\n"
        )
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        self.assertIn(run.returncode, (-signal.SIGSEGV, -signal.SIGBUS), run.stderr)
        self.assertNotIn("written", run.stdout)

    def test_a_model_is_found_by_its_digest_too(self) -> None:
        by_digest = load_state_dict(digest=resolve(MODEL))
        by_name = load_state_dict(MODEL)
        self.assertEqual(
            {n: t.data_ptr() - next(iter(by_name.values())).data_ptr() for n, t in by_name.items()},
            {
                n: t.data_ptr() - next(iter(by_digest.values())).data_ptr()
                for n, t in by_digest.items()
            },
        )

    def test_a_module_built_on_the_meta_device_binds_the_mapping(self) -> None:
        state = load_state_dict(MODEL)
        weights = {n: t for n, t in state.items() if n.endswith(".weight")}
        name, weight = next(iter(sorted(weights.items())))
        with torch.device("meta"):
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        layer.load_state_dict({"weight": weight}, assign=True)
        self.assertEqual(layer.weight.data_ptr(), weight.data_ptr(), name)
        with torch.no_grad():
            x = torch.ones(1, weight.shape[1], dtype=weight.dtype)
            self.assertTrue(torch.allclose(layer(x), x @ weight.T))


class Refusals(unittest.TestCase):
    def test_a_name_that_is_not_published_is_refused_with_the_published_names(self) -> None:
        with self.assertRaisesRegex(LookupError, f"'nope' is not among the published models \\({MODEL}"):
            load_state_dict("nope")

    def test_no_bindings_yet_says_the_weights_are_not_ready(self) -> None:
        with tempfile.TemporaryDirectory() as empty:
            with self.assertRaisesRegex(FileNotFoundError, "the weights are not ready"):
                load_state_dict(MODEL, bindings=empty)

    def test_a_path_for_a_digest_is_refused(self) -> None:
        with self.assertRaisesRegex(LayoutError, "not a sha256 digest"):
            load_state_dict(digest="../../etc")

    def crafted(self, change: "dict[str, object]") -> Path:
        """A copy of the model's folder in a store of its own, its manifest's first tensor
        changed as `change` says."""
        digest = resolve(MODEL)
        store = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, store)
        folder = store / "blobs" / digest
        shutil.copytree(STORE / "blobs" / digest, folder)
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        manifest["tensors"][0].update(change)
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
        return store

    def test_crafted_manifests_are_refused_in_words(self) -> None:
        digest = resolve(MODEL)
        for change, words in [
            ({"offset": 1 << 40}, "runs past the end"),
            ({"offset": 3}, "unaligned offset"),
            ({"length": 4}, "does not match its shape"),
            ({"dtype": "F128"}, "unknown dtype"),
            ({"shape": "x"}, "does not follow the layout"),
            ({"shape": "12"}, "does not follow the layout"),
        ]:
            with self.subTest(change=change):
                store = self.crafted(change)
                with self.assertRaisesRegex(LayoutError, words):
                    load_state_dict(digest=digest, store=store)


if __name__ == "__main__":
    unittest.main()
