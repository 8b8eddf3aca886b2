"""Talks to an actor replica with NVIDIA's Triton client, as an existing user of the Open
Inference Protocol would, and writes down what it saw for the test to check.

usage: oip-client.py HOST:PORT MODEL FOLDER

FOLDER holds input-*.npy. Written there: binary-*.npy (each input sent and answered with the
binary tensor extension), json-*.npy (sent and answered as JSON), concurrent-*.npy (every input
sent at once, asynchronously), and report.json: health, server and model metadata, and the
status and message of each bad request, then whether a good request still succeeds, and the
status line of a request held half sent while the concurrent ones ran.
"""

import json
import pathlib
import socket
import sys
import time

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

url, model, folder = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
inputs = sorted(folder.glob("input-*.npy"))
client = httpclient.InferenceServerClient(url=url, concurrency=len(inputs) + 1)


def infer(array, binary=True, name="input", output="output", model_name=model, version="",
          shape=None):
    tensor = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array, binary_data=binary)
    if shape is not None:
        tensor.set_shape(shape)
    wanted = [httpclient.InferRequestedOutput(output, binary_data=binary)]
    return client.infer(model_name, [tensor], model_version=version, outputs=wanted)


def refusal(request):
    try:
        request()
    except InferenceServerException as e:
        return {"status": e.status(), "message": e.message()}
    return {"status": "200", "message": "accepted"}


report = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "server": client.get_server_metadata(),
    "model": client.get_model_metadata(model),
    "model_ready": client.is_model_ready(model),
}
for path in inputs:
    array = np.load(path)
    stem = path.stem.removeprefix("input-")
    np.save(folder / f"binary-{stem}.npy", infer(array).as_numpy("output"))
    np.save(folder / f"json-{stem}.npy", infer(array, binary=False).as_numpy("output"))

first = np.load(inputs[0])
width = first.shape[1]
report["errors"] = {
    "unknown_model": refusal(lambda: infer(first, model_name="no-such-model")),
    "unknown_version": refusal(lambda: infer(first, version="2")),
    "unknown_input": refusal(lambda: infer(first, name="x")),
    "unknown_output": refusal(lambda: infer(first, output="y")),
    "strings": refusal(lambda: infer(np.array([[b"a"]], dtype=np.object_))),
    "wrong_width": refusal(lambda: infer(np.ones((2, width + 1), dtype=np.float32))),
    "bytes_short_of_shape": refusal(lambda: infer(first, shape=[first.shape[0] + 1, width])),
    "json_short_of_shape": refusal(lambda: infer(first, binary=False,
                                                 shape=[first.shape[0] + 1, width])),
}
first_answer = np.load(folder / f"binary-{inputs[0].stem.removeprefix('input-')}.npy")
report["serves_after_errors"] = bool(np.array_equal(infer(first).as_numpy("output"), first_answer))



def send_async(path):
    array = np.load(path)
    tensor = httpclient.InferInput("input", list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return client.async_infer(model, [tensor])


# All at once, while one more request is on its way (a raw connection that has sent half of
# its body): the replica's passes wait for the others then, and merge them.
on_its_way = '{"inputs":[{"name":"input","shape":[1,%d],"datatype":"FP32","data":[%s]}]}' % (
    width, ",".join(["0"] * width))
host, port = url.split(":")
holder = socket.create_connection((host, int(port)))
holder.sendall(f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {url}\r\n"
               f"Content-Length: {len(on_its_way)}\r\nConnection: close\r\n\r\n".encode())
holder.sendall(on_its_way[:10].encode())
time.sleep(0.2)
handles = [(path, send_async(path)) for path in inputs]
for path, handle in handles:
    stem = path.stem.removeprefix("input-")
    np.save(folder / f"concurrent-{stem}.npy", handle.get_result().as_numpy("output"))
holder.sendall(on_its_way[10:].encode())
report["held_request"] = holder.makefile("rb").readline().decode().strip()
holder.close()
client.close()
(folder / "report.json").write_text(json.dumps(report, indent=1))
