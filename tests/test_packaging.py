"""The package as users install it: the source distribution holds everything the builds compile, the
library says which torch it was built against (and what to do when another one cannot load it), and a
command whose optional packages are missing says which."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from importlib.machinery import EXTENSION_SUFFIXES

import pytest
import torch

import subspace_ext
from subspace_ext import _C, cli, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_library_reports_the_torch_it_was_built_against():
    assert _C.torch_version() == torch.__version__
    assert ops._release("2.13.0+cpu") == ops._release("2.13.1") == "2.13" != ops._release("2.14.1+cu130")


def test_a_library_that_does_not_load_names_its_torch(tmp_path):
    """A torch other than the build's leaves symbols undefined: 'undefined symbol: _ZN3c10...', and even
    `subspace-ext --help` died with it. The error now names the torch the file was built against (read from
    its bytes) and how to rebuild; a source tree without a build says that instead of 'circular import'."""
    error = ImportError("undefined symbol: _ZN3c1010ValueErrorC1E")
    msg = ops._load_failure(error, str(tmp_path))
    assert f"not built in {tmp_path}" in msg and "--no-build-isolation -e ." in msg
    lib = tmp_path / ("_C" + EXTENSION_SUFFIXES[0])   # this interpreter's name for it
    lib.write_bytes(b"\x7fELF\0junk\0subspace_ext: built against torch 2.12.1+cpu\0more")
    msg = ops._load_failure(error, str(tmp_path))
    assert f"does not load with torch {torch.__version__}" in msg and "built against torch 2.12.1+cpu" in msg
    assert "undefined symbol" in msg and "--force-reinstall" in msg
    lib.write_bytes(f"\0subspace_ext: built against torch {torch.__version__}\0".encode())   # not torch's fault
    assert ops._load_failure(ImportError("libcudart.so.13: cannot open"), str(tmp_path)).endswith(
        f"it was built against this torch, {torch.__version__}")
    real = [f for f in os.listdir(os.path.dirname(_C.__file__)) if f.startswith("_C.")]
    with open(os.path.join(os.path.dirname(_C.__file__), real[0]), "rb") as f:   # the marker is in the build
        assert f"subspace_ext: built against torch {torch.__version__}\0".encode() in f.read()


@pytest.mark.parametrize("missing", ["not_installed_pkg", "not_installed_pkg.sub", "safetensors.no_such_module"])
def test_a_missing_optional_package_is_named(monkeypatch, capsys, missing):
    """A base install lacks the extras: the command names the package, where it was a traceback. A module
    missing from an installed package is a bug, not a missing extra: raised as it is."""
    def needs(args):
        raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
    monkeypatch.setattr(cli, "_solar_inspect", needs)
    if missing.startswith("safetensors"):
        with pytest.raises(ModuleNotFoundError):
            cli.main(["solar", "inspect", "x.safetensors"])
        return
    assert cli.main(["solar", "inspect", "x.safetensors"]) == 1
    err = capsys.readouterr().err
    assert "needs the package not_installed_pkg, which is not installed" in err and "subspace_ext[methods]" in err


def _tracked(*folders):
    out = subprocess.run(["git", "ls-files", *folders], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout:
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [p for p in out.stdout.split() if os.path.isfile(os.path.join(ROOT, p))]


def _env(tmp_path, torch_importable: bool) -> dict:
    """The environment of a setup.py run; without torch, a package of that name that fails to import comes
    first on the path (as in pip's or `python -m build`'s isolated build environment)."""
    env = dict(os.environ, SUBSPACE_EXT_CUDA="0")
    if not torch_importable:
        shadow = tmp_path / "shadow"
        (shadow / "torch").mkdir(parents=True)
        (shadow / "torch" / "__init__.py").write_text("raise ImportError('no torch in this environment')\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shadow), env.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
@pytest.mark.parametrize("torch_importable", [True, False], ids=["torch", "no_torch"])
def test_the_sdist_holds_what_the_builds_compile(tmp_path, torch_importable):
    """There was no MANIFEST.in: the sdist lacked csrc/sources.txt (setup.py reads it first), every header,
    the CUDA sources, CMakeLists.txt and the tests' helpers, so it could not be built. Without torch (an
    isolated build: `python -m build --sdist`) setup.py stopped before making one."""
    need = [p for p in _tracked("csrc", "tools", "tests") if p.endswith((".h", ".cpp", ".cu", ".py", ".txt"))]
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist",
                        "--dist-dir", str(dist)], cwd=ROOT, capture_output=True, text=True,
                       env=_env(tmp_path, torch_importable))
    assert r.returncode == 0, r.stderr[-2000:]
    (archive,) = [f for f in os.listdir(dist) if f.endswith(".tar.gz")]
    with tarfile.open(dist / archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    need += ["setup.py", "pyproject.toml", "CMakeLists.txt", "README.md", "MANIFEST.in"]
    assert len(need) > 40
    assert [p for p in need if p not in names] == []
    assert subspace_ext.__version__ in archive


def test_building_the_library_without_torch_says_what_to_do(tmp_path):
    """The library itself cannot be built without torch: the build stops with the advice, having built nothing."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(out), "--build-temp", str(out)],
                       cwd=ROOT, capture_output=True, text=True, env=_env(tmp_path, torch_importable=False))
    assert r.returncode != 0
    assert "install torch first, then build without build isolation" in r.stderr
    assert not out.exists()
