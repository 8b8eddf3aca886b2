"""GPU check of the cuda design (run on a machine with an NVIDIA GPU; not part of `make test`).

The worker's cuda path copies the weights once from the shared, read-only mapping to the GPU,
after pinning the mapping in place with cudaHostRegister (read-only flag). This checks, with
the GPU's own torch, on a model published by the real kube-zerocopy-weight-server into /dev/shm:
  - that a read-only MAP_SHARED tmpfs mapping can be pinned at all, and with which flags;
  - the host-to-device copy time of every tensor, pinned against pageable, medians of rounds;
  - that the device copies equal the mapped bytes.

  python3 scripts/gpu_pinning_check.py STORE DIGEST [ROUNDS]
"""
import json
import mmap
import os
import statistics
import sys
import time

import torch

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "Bool": torch.bool}
READ_ONLY, DEFAULT = 8, 0


def views(buf, manifest):
    out = []
    for t in manifest["tensors"]:
        flat = torch.frombuffer(buf, dtype=DTYPES[t["dtype"]], count=t["length"] // torch.tensor([], dtype=DTYPES[t["dtype"]]).element_size(), offset=t["offset"])
        out.append(flat.view(t["shape"]))
    return out


def copy_all(tensors):
    torch.cuda.synchronize()
    start = time.perf_counter()
    on_gpu = [t.to("cuda", non_blocking=False) for t in tensors]
    torch.cuda.synchronize()
    return time.perf_counter() - start, on_gpu


def main():
    store, digest = sys.argv[1], sys.argv[2]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    folder = os.path.join(store, "blobs", digest)
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    f = open(os.path.join(folder, "tensors.bin"), "rb")
    buf = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)
    size = len(buf)
    tensors = views(buf, manifest)
    base = tensors[0].data_ptr() - manifest["tensors"][0]["offset"]
    print(f"{torch.cuda.get_device_name()}: {size / 2**20:.1f} MiB mapped read-only at 0x{base:x}, "
          f"{len(tensors)} tensors, torch {torch.__version__}")
    torch.cuda.init()
    for t in tensors:  # fault the pages in, so both sides copy from resident memory
        t.sum()
    pageable = [copy_all(tensors)[0] for _ in range(rounds)]
    cudart = torch.cuda.cudart()
    pinned_with = None
    for name, flag in [("read-only", READ_ONLY), ("default", DEFAULT)]:
        err = cudart.cudaHostRegister(base, size, flag)
        print(f"cudaHostRegister({name}) on the read-only shared mapping -> {err}")
        if int(err) == 0:
            pinned_with = name
            break
    if pinned_with is None:
        print("pinning is not possible here: the copy runs from pageable memory")
        sys.exit(1)
    pinned_times = []
    for _ in range(rounds):
        secs, on_gpu = copy_all(tensors)
        pinned_times.append(secs)
    equal = all(torch.equal(g.cpu(), t) for g, t in zip(on_gpu, tensors))
    cudart.cudaHostUnregister(base)
    p, q = statistics.median(pageable), statistics.median(pinned_times)
    gib = size / 2**30
    print(f"host-to-device copy of every tensor, median of {rounds}: pageable {p * 1e3:.1f} ms ({gib / p:.1f} GiB/s), "
          f"pinned ({pinned_with}) {q * 1e3:.1f} ms ({gib / q:.1f} GiB/s)")
    print(f"device copies equal the mapped bytes: {equal}")
    print(f"copy-ratio pageable/pinned = {p / q:.2f}")
    assert equal


if __name__ == "__main__":
    main()
