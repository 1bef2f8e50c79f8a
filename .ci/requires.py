"""Print, one per line, the requirements of an installed distribution that apply on this machine,
less the ones named after it; for `pip install -r`.

    python .ci/requires.py torch triton     # torch's dependencies, triton left out

The CUDA build check installs torch with --no-deps and then this list: triton (0.9 GB) is needed
only by torch.compile, and CI's disk is not always large enough for it beside the CUDA libraries.
"""
import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

dist, *skip = sys.argv[1:]
skip = {s.lower() for s in skip}
for line in requires(dist) or []:
    req = Requirement(line)
    if req.name.lower() in skip or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
        continue
    print(f"{req.name}{'[' + ','.join(sorted(req.extras)) + ']' if req.extras else ''}{req.specifier}")
