"""The Python side of `make bench-python` (tests/src/bin/bench_python.rs).

``make <folder> <smoke>``: a GPT-2-shaped model with seeded weights, written with
``save_pretrained`` into ``<folder>`` (GPT-2 small's shape, 124M parameters; a tiny one for the
smoke mode).

``load zero-copy <store> <digest> <folder>`` or ``load from-pretrained <folder>``: one new
process's load, measured after its imports: the load step (the model built and its weights in
place), then a first inference. Prints one JSON line; with ``--hold`` it then waits until stdin
closes, so that its memory can be read.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import kube_zerocopy


def make(folder: str, smoke: bool) -> None:
    torch.manual_seed(3)
    if smoke:
        config = GPT2Config(
            vocab_size=1000, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
        )
    else:
        config = GPT2Config()  # GPT-2 small: 124M parameters, f32
    GPT2LMHeadModel(config).eval().save_pretrained(folder, safe_serialization=True)


def load(args: list[str]) -> None:
    started = time.perf_counter()
    if args[0] == "zero-copy":
        store, digest, folder = args[1:4]
        weights = kube_zerocopy.load_state_dict(digest=digest, store=store)
        with kube_zerocopy.empty_weights():
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        kube_zerocopy.bind(model, weights)
    else:
        model = AutoModelForCausalLM.from_pretrained(args[1]).eval()
    loaded = time.perf_counter()
    ids = torch.arange(16).reshape(1, 16) % model.config.vocab_size
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    inferred = time.perf_counter()
    print(
        json.dumps(
            {
                "load_ms": (loaded - started) * 1000,
                "first_infer_ms": (inferred - loaded) * 1000,
                "checksum": float(logits[0, -1, :8].sum()),
            }
        ),
        flush=True,
    )
    if "--hold" in args:
        sys.stdin.read()


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3] == "smoke")
    else:
        load(sys.argv[2:])
