"""`subspace-ext bench` / subspace_ext.bench.run: the report at the quick size, and its argument errors."""
import pytest
import torch

from subspace_ext import bench, cli


def test_quick_report_has_every_op_and_baseline():
    lines = []
    report = bench.run(quick=True, out=lines.append)
    assert report.splitlines() == lines
    rows = [l for l in lines if l.startswith("| ") and not l.startswith("| op") and "---" not in l]
    ops_seen = {r.split(" | ")[0].strip("| ") for r in rows}
    assert ops_seen == {"rsvd_many", "small_svd", "gram_orth", "project", "project_perturbed", "reconstruct_perturbed",
                        "solar_basis", "pair_importance", "fuse_pairs_", "reinit_pairs_", "philox_normal",
                        "philox_normal icdf"}
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert float(cells[2]) > 0 and float(cells[4]) > 0 and float(cells[5]) > 0
    assert any("floor: its GEMMs with W only" in r for r in rows)
    for r in (r for r in rows if r.startswith("| solar_basis")):  # both sides' bases orthonormal
        assert all(float(e) < 1e-12 for e in r.strip("|").split("|")[6].split("/")), r


def test_solar_basis_baseline_is_the_same_kind_of_basis():
    """The torch baseline builds complete bases that start with W's singular vectors, as ours do
    (up to sign), with the completion spanning the rest: the same work, not a cheaper one."""
    W = torch.randn(30, 12)
    for eps in (0.0, 0.1):
        U, V = bench.solar_basis_torch(W, eps)
        assert U.shape == (30, 30) and V.shape == (12, 12) and bench.orthonormality_error([U, V]) < 1e-12
    (U, V), (Uo, Vo) = bench.solar_basis_torch(W), bench.ops.solar_basis(W, 0, 0, 0.0)
    eye = torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close((U[:, :12].T @ Uo[:, :12]).abs(), eye, atol=1e-9, rtol=0)  # signs aside
    torch.testing.assert_close((V.T @ Vo).abs(), eye, atol=1e-9, rtol=0)
    rest, rest_ours = U[:, 12:], Uo[:, 12:]  # another completion of the same complement
    torch.testing.assert_close(rest @ rest.T, rest_ours @ rest_ours.T, atol=1e-9, rtol=0)


def test_large_set_rows(monkeypatch):
    """--large: the 7B-shaped set's rows (here at toy shapes: the real set is 14 GB), each rank with
    the svd_lowrank loop and the GEMM floor at equal error; the TF32 variant only on CUDA."""
    monkeypatch.setattr(bench, "LARGE_SHAPES", [(80, 72), (72, 100)])  # rank 64 needs min(m, n) >= 64
    tf32 = torch.backends.cuda.matmul.allow_tf32
    report = bench.run(quick=True, out=lambda _: None, large=True).splitlines()
    rows = [r for r in report if "7B-shaped" in r]
    assert torch.backends.cuda.matmul.allow_tf32 == tf32  # restored
    for rank in (16, 64):
        mine = [r for r in rows if f"rank {rank} |" in r and "TF32" not in r]
        assert any("svd_lowrank loop" in r for r in mine) and any("floor: its GEMMs" in r for r in mine)
    assert not any("TF32" in r for r in rows)  # a CPU run
    # the GPU run's probes of the CUDA kernels' changes (2026-12-07 review), each against its neighbour
    probes = [r for r in report if "(odd k)" in r or "(odd q)" in r or "zeros (every column completed)" in r]
    assert len(probes) == 3 and all(float(r.split("|")[3]) > 0 and float(r.split("|")[5]) > 0 for r in probes)
    assert not any("(odd k)" in r for r in bench.run(quick=True, out=lambda _: None).splitlines())


def test_large_set_on_the_cpu_needs_the_memory(monkeypatch, capsys):
    """--large on the CPU allocated the 14 GB set whatever the machine had; it is refused up front where the
    memory is short (the set and both sides' workspaces)."""
    monkeypatch.setattr(bench.os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 2**20}[name])
    with pytest.raises(ValueError, match=r"needs about 26 GiB of memory .* this machine has 4 GiB in total"):
        bench.run(quick=True, out=lambda _: None, large=True)
    assert cli.main(["bench", "--quick", "--large"]) == 1
    assert "needs about 26 GiB" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_device_without_gpu_is_a_clear_error(capsys):
    with pytest.raises(ValueError, match="needs a GPU"):
        bench.run(quick=True, device="cuda")
    assert cli.main(["bench", "--quick", "--device", "cuda"]) == 1
    assert "needs a GPU" in capsys.readouterr().err


def test_bad_arguments():
    with pytest.raises(ValueError, match="device"):
        bench.run(quick=True, device="tpu")
    with pytest.raises(ValueError, match="threads"):
        bench.run(quick=True, threads=0)


def test_output_never_replaces_another_kind_of_file(tmp_path, capsys):
    """--output refuses an existing file that is not a benchmark report, before any timing runs."""
    other = tmp_path / "weights.safetensors"
    other.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    before = other.read_bytes()
    assert cli.main(["bench", "--quick", "--output", str(other)]) == 1
    err = capsys.readouterr().err
    assert "exists and is not a benchmark report" in err and other.read_bytes() == before
