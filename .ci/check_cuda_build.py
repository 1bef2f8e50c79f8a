"""Load the CUDA build of subspace_ext._C (no GPU needed) and check that every op of
subspace_ext.ops.CUDA_OPS has a CUDA implementation registered, and that the others have none.

    python .ci/check_cuda_build.py BUILD_LIB_DIR          # setup.py's build (subspace_ext/_C*.so)
    python .ci/check_cuda_build.py path/to/library.so     # e.g. CMake's libsubspace_ext_core.so
"""
import ast
import glob
import os
import sys

import torch

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
lib = [sys.argv[1]] if sys.argv[1].endswith(".so") else glob.glob(os.path.join(sys.argv[1], "subspace_ext", "_C*.so"))
if len(lib) != 1:
    sys.exit(f"check_cuda_build: expected one _C*.so under {sys.argv[1]}, found {lib}")
torch.ops.load_library(lib[0])
# ops.CUDA_OPS, read from the source (importing subspace_ext would load the CPU build)
with open(os.path.join(root, "subspace_ext", "ops.py"), encoding="utf-8") as f:
    tree = ast.parse(f.read())
cuda_ops = next(ast.literal_eval(node.value.args[0]) for node in ast.walk(tree)
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CUDA_OPS")
names = [n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("subspace_ext::")]
bad = []
for name in sorted(names):
    has = torch._C._dispatch_has_kernel_for_dispatch_key(f"subspace_ext::{name}", "CUDA")
    if has != (name in cuda_ops):
        bad.append(f"{name}: CUDA kernel {'registered' if has else 'missing'}, CUDA_OPS says "
                   f"{'yes' if name in cuda_ops else 'no'}")
    print(f"  {name:20s} CUDA: {'yes' if has else 'no'}")
if bad:
    sys.exit("check_cuda_build: " + "; ".join(bad))
print(f"check_cuda_build: {lib[0]} (torch {torch.__version__}) registers CUDA implementations for {len(cuda_ops)} ops")
