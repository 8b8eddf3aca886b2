"""Builds the models and inputs that the demo, the tests and the benchmark run on.

Nothing is downloaded: every weight is drawn from a seeded generator, so a model of a given
shape is the same file on every machine (and so has the same sha256).

  make_models.py mlp OUT.safetensors --sizes 256,512,10 [--dtype bf16]
  make_models.py script OUT.pt --sizes 256,512,10 [--freeze]
  make_models.py inputs DIR --shards 8 --batch 16 --features 256
  make_models.py forward OUT_DIR --input DIR --chain ENCODER.pt,HEAD.safetensors

`forward` is the tests' reference that shares no code with the worker: PyTorch runs each input
shard through the chain (a .pt with torch.jit, a .safetensors as the Mlp it describes: Linear
layers with ReLU between them) and writes `output` per shard.
"""
import argparse
import os

import torch
from safetensors.torch import save_file


def mlp_state(sizes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        state[f"layers.{i}.weight"] = (torch.randn(b, a, generator=g) / a**0.5).to(dtype)
        state[f"layers.{i}.bias"] = (torch.randn(b, generator=g) * 0.1).to(dtype)
    return state


class ScriptNet(torch.nn.Module):
    """Linear layers with BatchNorm between them (buffers: running statistics) and a
    registered buffer that forward uses, so that parameters and buffers both matter."""

    def __init__(self, sizes):
        super().__init__()
        pairs = list(zip(sizes, sizes[1:]))
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(a, b), torch.nn.BatchNorm1d(b), torch.nn.ReLU())
            for a, b in pairs[:-1]
        )
        self.head = torch.nn.Linear(*pairs[-1])
        self.register_buffer("output_scale", torch.linspace(0.5, 1.5, sizes[-1]))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x) * self.output_scale


def script_model(sizes, seed, freeze):
    torch.manual_seed(seed)
    net = ScriptNet(sizes)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for norm in (block[1] for block in net.blocks):
            norm.running_mean.copy_(torch.randn(norm.num_features, generator=g) * 0.1)
            norm.running_var.copy_(torch.rand(norm.num_features, generator=g) + 0.5)
    module = torch.jit.script(net.eval())
    if freeze:
        module = torch.jit.freeze(module)
    return module


class PairNet(torch.nn.Module):
    """Returns two tensors, as models with an auxiliary output do."""

    def __init__(self, sizes):
        super().__init__()
        self.head = torch.nn.Linear(sizes[0], sizes[-1])

    def forward(self, x):
        y = self.head(x)
        return y, y * 2


def mlp_forward(state, x):
    layers = sorted({int(k.split(".")[1]) for k in state})
    x = x.to(state[f"layers.{layers[0]}.weight"].dtype)
    for n, i in enumerate(layers):
        x = torch.nn.functional.linear(x, state[f"layers.{i}.weight"], state[f"layers.{i}.bias"])
        if n != len(layers) - 1:
            x = torch.relu(x)
    return x


def forward(chain, input_dir, out_dir):
    from safetensors.torch import load_file

    steps = []
    for path in chain:
        if path.endswith(".pt"):
            module = torch.jit.load(path).eval()
            steps.append(module)
        else:
            state = load_file(path)
            steps.append(lambda x, state=state: mlp_forward(state, x))
    os.makedirs(out_dir, exist_ok=True)
    with torch.no_grad():
        for name in sorted(os.listdir(input_dir)):
            if not name.endswith(".safetensors"):
                continue
            x = load_file(os.path.join(input_dir, name))["input"]
            for step in steps:
                x = step(x)
            save_file({"output": x.contiguous()}, os.path.join(out_dir, name))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["mlp", "script", "pair", "inputs", "forward"])
    p.add_argument("out")
    p.add_argument("--sizes", default="256,512,10")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--freeze", action="store_true")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--input", help="forward: the folder of input shards")
    p.add_argument("--chain", help="forward: the models, comma-separated, in order")
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    if a.kind == "mlp":
        save_file(mlp_state(sizes, dtype, a.seed), a.out)
    elif a.kind == "forward":
        forward(a.chain.split(","), a.input, a.out)
    elif a.kind == "script":
        script_model(sizes, a.seed, a.freeze).save(a.out)
    elif a.kind == "pair":
        torch.manual_seed(a.seed)
        torch.jit.script(PairNet(sizes).eval()).save(a.out)
    else:
        os.makedirs(a.out, exist_ok=True)
        g = torch.Generator().manual_seed(a.seed)
        for i in range(a.shards):
            x = torch.randn(a.batch, a.features, generator=g).to(dtype)
            save_file({"input": x}, os.path.join(a.out, f"shard-{i:05d}.safetensors"))


if __name__ == "__main__":
    main()
