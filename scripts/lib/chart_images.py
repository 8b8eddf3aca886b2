"""The images a rendered chart (helm template, on stdin) uses, one per line, registry spelled
out: every image a workload runs, and the runtime images the operator is told for the
pipelines' pods (the value after the variable's name). Line by line, as helm prints them."""

import re
import sys

names = set()
wanted = False
for line in sys.stdin:
    image = re.match(r"\s*(?:- )?image:\s*\"?([^\"\s]+)", line)
    if image:
        names.add(image.group(1))
    if wanted:
        value = re.match(r"\s*value:\s*\"?([^\"\s]+)", line)
        if value:
            names.add(value.group(1))
    wanted = re.search(r"name:\s*KZC_(CUDA_)?RUNTIME_IMAGE\s*$", line) is not None
for name in sorted(names):
    # A name without a registry (no dot in its first part) is Docker Hub's.
    print(name if "." in name.split("/")[0] else "docker.io/" + name)
