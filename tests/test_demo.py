"""The end-to-end demo (subspace_ext.demo, `subspace-ext demo`) at a tiny size, so it cannot rot."""
from __future__ import annotations

import json
import os

import pytest

from subspace_ext import cli, demo, io

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    return out, demo.run(out, demo.quick_config(), progress=False, log=lambda m: None)


def test_demo_replaces_only_an_earlier_demos_output(quick_run, tmp_path, monkeypatch):
    out, _ = quick_run
    assert os.path.isfile(os.path.join(out, demo.MARKER))   # so a second demo there may replace its files
    ran = []
    monkeypatch.setattr(demo, "_run", lambda out_dir, *a: ran.append(out_dir) or {})   # the folder check only
    demo.run(out, demo.quick_config())                        # a demo's folder
    older = tmp_path / "older"                                # an older build's: results.json, no marker
    older.mkdir()
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        (older / "results.json").write_text(f.read())
    demo.run(str(older), demo.quick_config())
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text('{"mine": 1}')
    with pytest.raises(ValueError, match="holds files no earlier demo wrote"):
        demo.run(str(other), demo.quick_config())
    demo.run(str(other), demo.quick_config(), force=True)
    assert ran == [out, str(older), str(other)]


def test_demo_writes_report_plots_and_artifacts(quick_run):
    out, res = quick_run
    cfg = demo.quick_config()
    for png in ("solar.png", "eigenlorax.png", "srlora.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", png
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        assert json.load(f)["eigenlorax"]["eigen_params"] == res["eigenlorax"]["eigen_params"]
    with open(os.path.join(out, "results.md"), encoding="utf-8") as f:
        md = f.read()
    for heading in ("## Headline", "## SOLAR", "## EigenLoRAx", "## SRLoRA", "![SRLoRA](srlora.png)"):
        assert heading in md
    # every task's adapter is a peft folder, the solar packages and the subspace exist
    for name in res["lora"]:
        ad = io.PeftAdapter.load(os.path.join(out, "adapters", name))
        assert ad.config["r"] == cfg.rank
    assert os.path.isfile(os.path.join(out, "eigenlorax", "subspace.safetensors"))
    assert os.path.isfile(os.path.join(out, "eigenlorax", cfg.held_out + ".safetensors"))
    # a SOLAR package per ratio and 'full', and a --method auto package per ratio
    assert len([f for f in os.listdir(os.path.join(out, "solar")) if f.endswith(".safetensors")]) == 2 * len(cfg.ratios) + 1


def test_demo_numbers_are_consistent(quick_run):
    _, res = quick_run
    cfg = demo.quick_config()
    accs = [r["acc"] for r in res["lora"].values()]
    assert all(0.0 <= a <= 1.0 for a in accs)
    rows = res["solar"]["rows"]
    full = [r for r in rows if r["ratio"] == "full"][0]
    assert full["error"] < 1e-5  # the complete basis is lossless
    assert abs(full["acc"] - res["solar"]["lora_acc"]) <= 1 / res["tasks"][cfg.solar_task][1] + 1e-9
    for r in rows:
        if r["ratio"] != "full":
            assert abs(r["actual_ratio"] - r["ratio"]) <= 0.01 and 0 < r["error"] <= 1.0 + 1e-6
            assert 0 < r["svd_error"] < 1.0
            assert r["auto_ratio"] <= r["ratio"] + 1e-9 and 0 < r["auto_error"] <= 1.0 + 1e-6
            assert r["auto_encodings"].endswith(" layers") and 0 <= r["auto_acc"] <= 1
    ei = res["eigenlorax"]
    # 12 layers (6 blocks x query, value) x 2 sides x K x r
    assert ei["eigen_params"] == 12 * 2 * cfg.components * cfg.rank
    assert ei["lora_params"] == 12 * (384 + 384) * cfg.rank
    sr = res["srlora"]
    assert sr["recompositions"] >= 1 and sr["pairs"] == sr["recompositions"] * 12 * 2
    assert sr["lora_curve"][0] == sr["srlora_curve"][0] == list(range(cfg.eval_every, cfg.steps + 1, cfg.eval_every))


def test_demo_config_errors():
    with pytest.raises(ValueError, match="held-out"):
        demo.run("unused", demo.DemoConfig(held_out="vader-polarity"))
    with pytest.raises(ValueError, match="unknown task"):
        demo.run("unused", demo.DemoConfig(solar_task="imdb"))
    with pytest.raises(ValueError, match="ratios"):
        demo.run("unused", demo.DemoConfig(ratios=(0.1, 1.5)))
    with pytest.raises(ValueError, match="steps"):
        demo.run("unused", demo.DemoConfig(steps=0))
    assert not os.path.exists("unused")


def test_demo_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0
    assert "--output" in capsys.readouterr().out
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["demo", "-o", str(blocker), "--quick"]) == 1
    assert "not a folder" in capsys.readouterr().err
    # a folder holding other files (notes, someone's adapter): refused before anything is written
    other = tmp_path / "other"
    (other / "adapters" / "vader-polarity").mkdir(parents=True)
    (other / "results.md").write_text("my notes")
    assert cli.main(["demo", "-o", str(other), "--quick", "-q"]) == 1
    assert "holds files no earlier demo wrote (adapters, results.md)" in capsys.readouterr().err
    assert (other / "results.md").read_text() == "my notes" and not (other / demo.MARKER).exists()


@pytest.mark.parametrize("argv", [["demo"], ["bench", "--quick"], ["solar", "compress", "a", "--base", "b"],
                                  ["solar", "decompress", "p", "--base", "b"], ["eigen", "build", "a", "b"],
                                  ["eigen", "export", "s", "--coefficients", "t"]])
def test_an_empty_output_path_is_a_usage_error(argv, capsys):
    """`eigen build a b -o ''` ran the whole build and then failed to rename its file into ''."""
    flag = "--output" if argv[0] == "bench" else "-o"
    with pytest.raises(SystemExit) as e:
        cli.main(argv + [flag, ""])
    assert e.value.code == 2 and "expected a path, got an empty string" in capsys.readouterr().err
