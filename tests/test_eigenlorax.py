"""EigenLoRAx (subspace_ext.eigenlorax): principal subspaces of N LoRA adapters, loadings-only tasks
on top of them, merge/unmerge, task switching, export to peft, errors and the ``eigen`` CLI.

Checks the behaviour promised in DESIGN.md section 3 "EigenLoRAx". Almost everything runs on
synthetic ``PeftAdapter`` objects built in memory (a toy two-Linear model, or MiniLM's query/value
shapes); one session fixture trains two tiny real LoRA adapters on word tasks for the one real
training run. Whole file: well under a minute on 2 CPU cores.
"""
from __future__ import annotations

import copy
import io as io_module
import json
import math
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import warnings
from typing import List

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import subspace_ext
from subspace_ext import cli, data, eigenlorax, io, models, train
from subspace_ext.eigenlorax import EigenSubspace
from subspace_ext.io import FormatError, PeftAdapter

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

PEFT_PREFIX = "base_model.model."
TOY_LAYERS = {"enc.q": (48, 40), "enc.v": (32, 40)}  # module -> (out m, in n)
MINILM_LAYERS = {f"bert.encoder.layer.{i}.attention.self.{p}": (384, 384) for i in range(6) for p in ("query", "value")}
WORDS = ["wonderful", "terrible", "okay", "disaster", "love", "boring", "table", "quickly"]


# ---------------------------------------------------------------------------------------------
# helpers


def make_adapter(layers, r, make, *, alpha=None, base_name="synthetic-base") -> PeftAdapter:
    """A peft LoRA adapter in memory; ``make(module, m, n) -> (B m x r, A r x n)``."""
    tensors = {}
    for mod, (m, n) in layers.items():
        B, A = make(mod, m, n)
        assert B.shape == (m, r) and A.shape == (r, n)
        tensors[f"{PEFT_PREFIX}{mod}.lora_A.weight"] = A.float().contiguous()
        tensors[f"{PEFT_PREFIX}{mod}.lora_B.weight"] = B.float().contiguous()
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha if alpha is not None else r,
           "target_modules": sorted(layers), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
           "use_rslora": False, "base_model_name_or_path": base_name, "task_type": None}
    return PeftAdapter(cfg, tensors)


def random_adapters(layers, N, r, **kw):
    return [make_adapter(layers, r, lambda mod, m, n: (torch.randn(m, r), torch.randn(r, n)), **kw)
            for _ in range(N)]


class Toy(torch.nn.Module):
    """Two Linears named like TOY_LAYERS and a head."""

    def __init__(self, q_in=40, q_name="q"):
        super().__init__()
        self.enc = torch.nn.Module()
        setattr(self.enc, q_name, torch.nn.Linear(q_in, 48))
        self.enc.v = torch.nn.Linear(40, 32)
        self.head = torch.nn.Linear(80, 2)
        self.q_name = q_name

    def forward(self, x):
        return self.head(torch.cat([getattr(self.enc, self.q_name)(x), self.enc.v(x)], -1))


def toy_subspace(N=3, r=4, **kw):
    kw.setdefault("components", 6)
    return eigenlorax.build_subspace(random_adapters(TOY_LAYERS, N, r), **kw)


def randomize(em, seed):
    """Random loadings (a stand-in for a trained task)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for l in em.layers.values():
            l.alpha_A.copy_(torch.randn(l.alpha_A.shape, generator=g))
            l.alpha_B.copy_(torch.randn(l.alpha_B.shape, generator=g))


def close(got, exp, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(got.double(), exp.double(), atol=atol, rtol=rtol)


def principal_cosines(Q, P):
    """Cosines of the principal angles between span(Q) and span(P) (both orthonormal)."""
    return torch.linalg.svdvals(Q.double().T @ P.double())


def reference_pca(adapters, mod, side):
    """(U, explained ratio) of the row-centred stack, float64, full SVD (the formulation's definition)."""
    ups = [{u.module: u for u in a.updates()}[mod] for a in adapters]
    M = torch.cat([u.A.double().T if side == "A" else u.B.double() * u.scaling for u in ups], dim=1)
    U, S, _ = torch.linalg.svd(M - M.mean(dim=1, keepdim=True), full_matrices=False)
    e = S * S
    return U, e / e.sum()


@pytest.fixture(scope="module")
def minilm():
    """MiniLM classifier (seed 0) and tokenizer, loaded once; tests deepcopy the model."""
    model, tok = train.load_classifier(seed=0)
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def minilm_subspace():
    """K=16 subspace (N=3, r=8: rank cap 23) on MiniLM's 12 query/value shapes, with base fingerprints."""
    return eigenlorax.build_subspace(random_adapters(MINILM_LAYERS, 3, 8, alpha=16), components=16,
                                     base=str(models.minilm_dir()))


@torch.no_grad()
def logits(model, enc):
    model.eval()
    return model(**enc).logits.double()


def rewrite(path, tensors=None, **metadata):
    """Re-save a safetensors file with some tensors / metadata entries replaced (an entry None: dropped),
    as an older writer, a hand edit or a tamperer would."""
    with safe_open(path, framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata() or {})
    t.update(tensors or {})
    meta.update(metadata)
    save_file(t, path, metadata={k: v for k, v in meta.items() if v is not None})


def trained_head_task(minilm, minilm_subspace, scaling=2.0):
    """(model, em, head): MiniLM with random loadings and a random head (a stand-in for a trained task);
    head keyed by the model's parameter names, as the README and the demo save it."""
    model = copy.deepcopy(minilm[0])
    em = eigenlorax.apply(model, minilm_subspace, 8, scaling=scaling, init="uniform", trainable=("classifier",))
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.5)
        model.classifier.bias.normal_()
    return model, em, {n: p for n, p in model.named_parameters() if "classifier" in n}


# ---------------------------------------------------------------------------------------------
# build_subspace: recovery, explained variance, K rules, augmentation


def test_recovers_shared_subspace():
    """Adapters built inside span(Q_B) / span(Q_A) give exactly those spans back.

    Mean-centring subtracts, from every column of the stack M = [B_1 .. B_N], the mean column
    μ = M·1/c; since every column lies in span(Q), so does μ, hence so does every centred column.
    With N·r = 24 columns of random X_i the centred stack still has rank 5, so its top 5 left
    singular vectors span exactly span(Q) (up to the tiny noise). lora_alpha = 2r (scaling 2) is folded
    into B by the builder: that rescales columns and does not change their span.
    """
    N, r, k = 6, 4, 5
    g = torch.Generator().manual_seed(1)
    QB = {mod: torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0] for mod, (m, n) in TOY_LAYERS.items()}
    QA = {mod: torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0] for mod, (m, n) in TOY_LAYERS.items()}

    def make(mod, m, n):
        X, Y = torch.randn(k, r, generator=g, dtype=torch.float64), torch.randn(k, r, generator=g, dtype=torch.float64)
        B = QB[mod] @ X + 1e-6 * torch.randn(m, r, generator=g, dtype=torch.float64)
        A = (QA[mod] @ Y).T + 1e-6 * torch.randn(r, n, generator=g, dtype=torch.float64)
        return B, A

    ads = [make_adapter(TOY_LAYERS, r, make, alpha=2 * r) for _ in range(N)]
    sub = eigenlorax.build_subspace(ads, components=k)
    assert sub.modules == list(TOY_LAYERS)
    for mod, (m, n) in TOY_LAYERS.items():
        PB, PA = sub.B[mod].P, sub.A[mod].P
        assert PB.shape == (m, k) and PA.shape == (n, k)
        assert principal_cosines(QB[mod], PB).min() > 0.999, mod
        assert principal_cosines(QA[mod], PA).min() > 0.999, mod
        close(PB.T @ PB, torch.eye(k), atol=1e-5)
        close(PA.T @ PA, torch.eye(k), atol=1e-5)
        # essentially all the (centred) variance is in those 5 directions
        assert float(sub.B[mod].explained.sum()) > 0.999
        assert float(sub.A[mod].explained.sum()) > 0.999


def test_explained_variance_matches_reference_and_is_monotone():
    N, r = 3, 4
    ads = random_adapters(TOY_LAYERS, N, r)
    sub = eigenlorax.build_subspace(ads, components=N * r - 1)
    for mod in TOY_LAYERS:
        for side in ("A", "B"):
            b = getattr(sub, side)[mod]
            e = b.explained.double()
            assert e.shape == (N * r - 1,) and b.n_pc == N * r - 1
            assert bool((e[1:] <= e[:-1] + 1e-7).all()), f"{mod}.{side}: explained not non-increasing: {e}"
            assert float(e.sum()) <= 1 + 1e-5 and float(e.min()) >= 0
            U, ref = reference_pca(ads, mod, side)
            close(e, ref[: N * r - 1], atol=1e-6, rtol=1e-4)
            assert principal_cosines(U[:, :6], b.P[:, :6]).min() > 0.999


def test_variance_picks_smallest_k():
    N, r = 4, 4
    ads = random_adapters(TOY_LAYERS, N, r)
    mod = "enc.q"
    for side in ("A", "B"):
        _, ref = reference_pca(ads, mod, side)
        cum = ref.cumsum(0)
        for k in (1, 3, 7, 12):
            v = float(cum[k - 1] + cum[k]) / 2   # strictly between: smallest K reaching v is k + 1
            sub = eigenlorax.build_subspace(ads, variance=v)
            b = getattr(sub, side)[mod]
            assert b.P.shape[1] == k + 1 and b.n_pc == k + 1, (side, v)
            assert float(b.explained.sum()) >= v - 1e-6
            assert float(b.explained[:-1].sum()) < v
    # variance 1.0 keeps every non-degenerate direction: capped at N·r − 1
    sub = eigenlorax.build_subspace(ads, variance=1.0)
    assert sub.size(mod) <= N * r - 1 and float(sub.A[mod].explained.sum()) > 1 - 1e-5


def test_wide_stacks_take_a_sketch_of_2k_directions_not_their_full_width(monkeypatch):
    """The principal directions came from an rsvd of the stack's full width (N·r − 1: 49 s for a 4096 x 1600
    side); now from a sketch of 2 K + 8 (components) or 64, doubled until enough is explained (variance).
    Against the full float64 PCA: the same directions, explained ratios (over the whole variance) and K."""
    layers = {"wide": (200, 150)}
    N, r, k = 12, 8, 4   # full width 95, sketch 16
    g = torch.Generator().manual_seed(3)
    Q = {s: torch.linalg.qr(torch.randn(d, 20, generator=g, dtype=torch.float64))[0]
         for s, d in (("B", 200), ("A", 150))}
    decay = torch.logspace(0, -2, 20, dtype=torch.float64)[:, None]

    def make(mod, m, n):   # a decaying spectrum, as trained adapters have, plus noise
        B = Q["B"] @ (decay * torch.randn(20, r, generator=g, dtype=torch.float64))
        A = (Q["A"] @ (decay * torch.randn(20, r, generator=g, dtype=torch.float64))).T
        return B + 1e-4 * torch.randn(m, r, generator=g), A + 1e-4 * torch.randn(r, n, generator=g)
    ads = [make_adapter(layers, r, make) for _ in range(N)]
    widths, rsvd = [], eigenlorax.ops.rsvd
    monkeypatch.setattr(eigenlorax.ops, "rsvd", lambda M, w, **kw: widths.append(w) or rsvd(M, w, **kw))
    sub = eigenlorax.build_subspace(ads, components=k)
    assert widths == [16, 16]
    for side in ("A", "B"):
        U, ref = reference_pca(ads, "wide", side)
        b = getattr(sub, side)["wide"]
        assert b.n_pc == k
        close(b.explained.double(), ref[:k], atol=1e-6, rtol=1e-5)
        assert principal_cosines(U[:, :k], b.P).min() > 0.9999
    # a flat spectrum: 0.95 needs more than the first sketches of 64 and 128 (240 columns: over 3 sketches wide)
    noise = random_adapters({"wide": (300, 280)}, 30, r)
    for v, sketches in ((0.5, [64]), (0.95, [64, 128, 239])):
        widths.clear()
        sub = eigenlorax.build_subspace(noise, variance=v)
        assert widths == sketches * 2
        for side in ("A", "B"):
            _, ref = reference_pca(noise, "wide", side)
            want = int((ref.cumsum(0) < v).sum()) + 1
            assert getattr(sub, side)["wide"].n_pc == want, (v, side)
            assert want > 128 if v == 0.95 else want < 64


def test_stacks_a_few_sketches_wide_take_an_exact_thin_svd(monkeypatch):
    """A stack at most 3 sketches wide (N·r <= 3 (2 K + 16)) takes a thin SVD, exact and 1.3-8x faster than the
    rsvd's power iterations there (the usual EigenLoRAx stack: N·r of 64-128 columns); one column more, the rsvd.
    Both match the float64 PCA to float32 rounding (the basis is stored in float32)."""
    layers, r, k = {"l": (90, 70)}, 8, 4   # K = 4: sketches of 16 + 8, so up to 72 columns are exact
    widths, rsvd = [], eigenlorax.ops.rsvd
    monkeypatch.setattr(eigenlorax.ops, "rsvd", lambda M, w, **kw: widths.append(w) or rsvd(M, w, **kw))
    g = torch.Generator().manual_seed(5)
    decay = torch.logspace(0, -3, 8, dtype=torch.float64)[:, None]
    Q = {s: torch.linalg.qr(torch.randn(d, 8, generator=g, dtype=torch.float64))[0] for s, d in (("B", 90), ("A", 70))}

    def make(mod, m, n):   # a decaying spectrum plus noise, distinct singular values
        B = Q["B"] @ (decay * torch.randn(8, r, generator=g, dtype=torch.float64))
        A = (Q["A"] @ (decay * torch.randn(8, r, generator=g, dtype=torch.float64))).T
        return B + 1e-5 * torch.randn(m, r, generator=g), A + 1e-5 * torch.randn(r, n, generator=g)
    for N, sketched in ((9, []), (10, [16, 16])):   # 72 and 80 columns
        ads = [make_adapter(layers, r, make) for _ in range(N)]
        widths.clear()
        sub = eigenlorax.build_subspace(ads, components=k)
        assert widths == sketched, N
        for side in ("A", "B"):
            U, ref = reference_pca(ads, "l", side)
            b = getattr(sub, side)["l"]
            assert b.n_pc == k
            close(b.explained.double(), ref[:k], atol=1e-6, rtol=1e-6)   # stored in float32
            assert principal_cosines(U[:, :k], b.P).min() > 1 - 1e-6


def test_k_capped_at_stack_rank():
    N, r = 3, 4
    with pytest.warns(subspace_ext.SubspaceExtWarning,
                      match=r"4 of 4 layer sides have fewer than components=20 directions \(down to "
                      r"11 principal ones\).*centred stack of 3 adapters.*augment=9 fills"):
        sub = eigenlorax.build_subspace(random_adapters(TOY_LAYERS, N, r), components=20)
    for mod in TOY_LAYERS:
        assert sub.A[mod].P.shape[1] == N * r - 1 and sub.B[mod].P.shape[1] == N * r - 1
    # the default (32) is capped too, and said so
    with pytest.warns(UserWarning, match=r"fewer than components=32 directions \(down to 3 principal ones\)"):
        sub = eigenlorax.build_subspace(random_adapters(TOY_LAYERS, 2, 2))
    assert {sub.size(m) for m in TOY_LAYERS} == {3}
    # no warning where the augmentation fills the request, the weight's side is narrower, or variance chose K
    ads = random_adapters(TOY_LAYERS, N, r)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert {sub.size(m) for sub in [eigenlorax.build_subspace(ads, components=20, augment=9)]
                for m in TOY_LAYERS} == {20}
        wide = eigenlorax.build_subspace(ads, components=60, augment=60)   # every side as wide as its weight
        assert [(wide.size(m, "B"), wide.size(m, "A")) for m in TOY_LAYERS] == [(48, 40), (32, 40)]
        eigenlorax.build_subspace(ads, variance=0.9)
    with pytest.warns(UserWarning, match=r"down to 11 principal ones \+ 5 augmented"):
        eigenlorax.build_subspace(ads, components=20, augment=5)


def test_k_capped_at_numerical_rank_and_a_layer_without_variance_refused():
    """DESIGN: cap K at the centred stack's rank, never return arbitrary directions beyond it. Adapters
    that share lora_A (LoRA-FA, or one init seed) stack to rank r − 1 on the A side; their B side keeps
    N·r − 1. A layer whose factors are equal in every adapter has no principal direction at all."""
    N, r = 3, 4
    A = {mod: torch.randn(r, n) for mod, (m, n) in TOY_LAYERS.items()}
    ads = [make_adapter(TOY_LAYERS, r, lambda mod, m, n: (torch.randn(m, r), A[mod])) for _ in range(N)]
    for kw in ({}, {"components": 50}, {"variance": 1.0}):
        sub = eigenlorax.build_subspace(ads, **kw)
        for mod in TOY_LAYERS:
            assert sub.size(mod, "A") == r - 1 and sub.size(mod, "B") == N * r - 1, kw
            assert sub.A[mod].explained.sum() == pytest.approx(1.0, abs=1e-6)
            # the r - 1 directions span the centred A rows exactly
            Ac = A[mod].T.double() - A[mod].T.double().mean(dim=1, keepdim=True)
            P = sub.A[mod].P.double()
            assert torch.linalg.norm(Ac - P @ (P.T @ Ac)) < 1e-5 * torch.linalg.norm(Ac)
    for side in ("lora_A", "lora_B"):   # the same factor in every adapter (an untrained layer: lora_B = 0)
        same = random_adapters(TOY_LAYERS, N, r)
        for ad in same:
            ad.tensors[f"{PEFT_PREFIX}enc.v.{side}.weight"] = same[0].tensors[f"{PEFT_PREFIX}enc.v.{side}.weight"] * 0
        with pytest.raises(ValueError, match=rf"layer enc\.v, {side}: the factors are the same in every adapter"):
            eigenlorax.build_subspace(same)


def test_build_takes_paths_and_iterables(tmp_path):
    dirs = []
    for i, ad in enumerate(random_adapters(TOY_LAYERS, 3, 4)):
        dirs.append(tmp_path / f"ad{i}")
        ad.save_adapter(str(dirs[-1]))
    ref = eigenlorax.build_subspace([str(d) for d in dirs], components=4)
    for given in (dirs, (d for d in dirs), map(str, dirs)):
        sub = eigenlorax.build_subspace(given, components=4)
        assert all(torch.equal(sub.A[m].P, ref.A[m].P) and torch.equal(sub.B[m].P, ref.B[m].P) for m in TOY_LAYERS)
    with pytest.raises(ValueError, match=r"ad0 and .*ad0 are the same adapter \(same folder\)"):
        eigenlorax.build_subspace([dirs[0], dirs[1], pathlib.Path(str(dirs[0]) + "/")])
    bad = random_adapters(TOY_LAYERS, 1, 4)[0]
    bad.tensors[f"{PEFT_PREFIX}enc.q.lora_B.weight"][0, 0] = math.nan
    bad.save_adapter(str(tmp_path / "nan"))
    with pytest.raises(FormatError, match=rf"{tmp_path / 'nan'}: layer enc\.q: lora_B holds NaN"):
        eigenlorax.build_subspace([dirs[0], tmp_path / "nan"])


def test_build_maps_adapters_saved_from_another_wrapper_of_the_base():
    """Adapters of a BertForSequenceClassification (bert.encoder...) beside one of a BertModel (encoder...):
    one prefix rewrite onto the first adapter's names, the same subspace as with matching names."""
    ads = random_adapters(TOY_LAYERS, 3, 4)
    ref = eigenlorax.build_subspace(ads, components=5)
    moved = copy.deepcopy(ads[2])
    moved.tensors = {k.replace(PEFT_PREFIX, PEFT_PREFIX + "model."): v for k, v in moved.tensors.items()}
    sub = eigenlorax.build_subspace([ads[0], ads[1], moved], components=5)
    assert sub.modules == ref.modules == list(TOY_LAYERS)
    assert all(torch.equal(sub.A[m].P, ref.A[m].P) and torch.equal(sub.B[m].P, ref.B[m].P) for m in TOY_LAYERS)
    fewer = random_adapters({"model.enc.q": TOY_LAYERS["enc.q"]}, 1, 4)[0]   # maps, but lacks enc.v
    with pytest.raises(ValueError, match=r"adapter\[1\] adapts different layers .*: missing \['enc\.v'\]"):
        eigenlorax.build_subspace([ads[0], fewer])


def test_build_warns_about_the_updates_it_leaves_out():
    ads = random_adapters(TOY_LAYERS, 2, 4)
    ads[1].tensors[f"{PEFT_PREFIX}emb.lora_embedding_A"] = torch.randn(4, 10)
    ads[1].tensors[f"{PEFT_PREFIX}emb.lora_embedding_B"] = torch.randn(6, 4)
    ads[1].tensors[f"{PEFT_PREFIX}enc.q.lora_B.bias"] = torch.randn(48)
    left = r"adapter\[1\]: LoRA on embeddings .* left out: .*emb, .*enc\.q\.lora_B\.bias"
    with pytest.warns(UserWarning, match=left):
        sub = eigenlorax.build_subspace(ads, components=2)
    assert sub.modules == list(TOY_LAYERS)


def test_augmentation_orthonormal_and_seeded():
    ads = random_adapters(TOY_LAYERS, 3, 4)
    k, extra = 5, 7
    plain = eigenlorax.build_subspace(ads, components=k)
    s1 = eigenlorax.build_subspace(ads, components=k, augment=extra, seed=1)
    s1b = eigenlorax.build_subspace(ads, components=k, augment=extra, seed=1)
    s2 = eigenlorax.build_subspace(ads, components=k, augment=extra, seed=2)
    for mod in TOY_LAYERS:
        for side in ("A", "B"):
            b, bb, b2, p = (getattr(s, side)[mod] for s in (s1, s1b, s2, plain))
            assert b.P.shape[1] == k + extra and b.n_pc == k and b.explained.shape == (k,)
            close(b.P.T @ b.P, torch.eye(k + extra), atol=2e-6)   # orthonormal, and ⟂ the principal ones
            assert principal_cosines(p.P, b.P[:, :k]).min() > 0.9999
            assert torch.equal(b.P, bb.P), "same seed must give identical directions"
            diff = (b.P[:, k:] - b2.P[:, k:]).abs().max()
            assert diff > 0.1, "a different seed must give different augmentation"
    # augmentation is capped by the dimension: d = 8 leaves room for only 3 extra directions
    small = {"x.l": (6, 8)}
    sub = eigenlorax.build_subspace(random_adapters(small, 3, 2), components=5, augment=10)
    PA = sub.A["x.l"].P
    assert PA.shape == (8, 8)
    close(PA.T @ PA, torch.eye(8), atol=2e-6)


def test_subspace_save_load_roundtrip(tmp_path):
    sub = toy_subspace(augment=3, seed=4)
    path = str(tmp_path / "sub.safetensors")
    sub.save(path)
    back = EigenSubspace.load(path)
    assert back.modules == sub.modules
    for mod in sub.modules:
        for side in ("A", "B"):
            a, b = getattr(sub, side)[mod], getattr(back, side)[mod]
            assert torch.equal(a.P, b.P) and torch.equal(a.explained, b.explained) and a.n_pc == b.n_pc
    assert back.meta["augment"] == 3 and back.meta["seed"] == 4


# ---------------------------------------------------------------------------------------------
# apply: parameters, forward, init


def test_only_loadings_trainable_and_count_formula():
    sub = toy_subspace(augment=2)
    model = Toy()
    r = 3
    em = eigenlorax.apply(model, sub, r, trainable=("head",))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(("alpha_A", "alpha_B")) or n.startswith("head.") for n in names), names
    formula = sum((sub.A[m].P.shape[1] + sub.B[m].P.shape[1]) * r for m in sub.modules)
    head = sum(p.numel() for p in model.head.parameters())
    assert em.coefficient_count() == formula
    assert em.trainable_parameters() == formula + head
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "alpha" in n) == formula
    # without `trainable`, only the loadings
    em2 = eigenlorax.apply(Toy(), sub, r)
    assert em2.trainable_parameters() == formula


def test_minilm_count_10x_smaller_than_lora(minilm, minilm_subspace):
    model = copy.deepcopy(minilm[0])
    r = 8
    em = eigenlorax.apply(model, minilm_subspace, r)
    sizes = {m: (minilm_subspace.A[m].P.shape[1], minilm_subspace.B[m].P.shape[1]) for m in MINILM_LAYERS}
    assert set(sizes.values()) == {(16, 16)}
    formula = sum((ka + kb) * r for ka, kb in sizes.values())
    assert em.trainable_parameters() == em.coefficient_count() == formula == 12 * 32 * 8
    lora = sum((m + n) * 8 for m, n in MINILM_LAYERS.values())   # LoRA r=8 on query/value
    assert lora >= 10 * formula, (lora, formula)


def test_forward_equals_dense_float64():
    sub = toy_subspace(augment=2)
    model = Toy()
    scaling, r = 0.7, 3
    ref = copy.deepcopy(model)
    em = eigenlorax.apply(model, sub, r, scaling=scaling, init="uniform")
    x = torch.randn(5, 40)
    for mod in TOY_LAYERS:
        layer = em.layers[mod]
        lin = dict(ref.named_modules())[mod]
        B = sub.B[mod].P.double() @ layer.alpha_B.detach().double()
        A = (sub.A[mod].P.double() @ layer.alpha_A.detach().double()).T
        exp = x.double() @ (lin.weight.double() + scaling * B @ A).T + lin.bias.double()
        with torch.no_grad():
            close(layer(x), exp, atol=1e-5, rtol=1e-5)
        # lora_factors agree with the definition
        Bf, Af = layer.lora_factors()
        close(Bf, B, atol=1e-5)
        close(Af, A, atol=1e-5)


def test_init_lora_is_base_uniform_is_not():
    sub = toy_subspace()
    base = Toy()
    x = torch.randn(7, 40)
    with torch.no_grad():
        y0 = base(x)
        m1 = copy.deepcopy(base)
        eigenlorax.apply(m1, sub, 4, init="lora")
        close(m1(x), y0, atol=1e-7, rtol=0)
        m2 = copy.deepcopy(base)
        em2 = eigenlorax.apply(m2, sub, 4, init="uniform")
        assert (m2(x) - y0).abs().max() > 1e-3
        for l in em2.layers.values():   # uniform(-0.5, 0.5) on both sides
            for a in (l.alpha_A, l.alpha_B):
                assert float(a.abs().max()) <= 0.5 and float(a.abs().max()) > 0.2


def test_init_project_starts_from_a_source_adapters_projection(tmp_path):
    """DESIGN's other loadings start: a source adapter's update projected onto the subspace, P_B P_Bᵀ ΔW P_A P_Aᵀ,
    best rank task_rank (float64 reference from the dense ΔW); columns past the projection's rank start as
    "lora" (B zero, A uniform: trainable, no change to the function); refused without a source, with a source
    that lacks a layer or is of another shape."""
    ads = random_adapters(TOY_LAYERS, 3, 4)
    sub = eigenlorax.build_subspace(ads, components=5)
    src = make_adapter(TOY_LAYERS, 4, lambda mod, m, n: (torch.randn(m, 4), torch.randn(4, n)), alpha=8)  # s = 2
    src.save_adapter(str(tmp_path / "src"))
    x = torch.randn(6, 40, dtype=torch.float64)
    for rank, scaling, source in ((4, 1.0, src), (2, 0.5, str(tmp_path / "src")), (7, 3.0, tmp_path / "src")):
        em = eigenlorax.apply(Toy(), sub, rank, init="project", source=source, scaling=scaling)
        for mod, (m, n) in TOY_LAYERS.items():
            PA, PB = sub.A[mod].P.double(), sub.B[mod].P.double()
            u = next(u for u in src.updates() if u.module == mod)
            proj = PB @ PB.T @ (u.scaling * u.B.double() @ u.A.double()) @ PA @ PA.T
            U, S, Vh = torch.linalg.svd(proj)
            k = min(rank, 4, PA.shape[1], PB.shape[1])
            want = (U[:, :k] * S[:k]) @ Vh[:k]
            layer = em.layers[mod]
            got = scaling * PB @ layer.alpha_B.double() @ layer.alpha_A.double().T @ PA.T
            close(got, want, atol=1e-5 * float(S[0]), rtol=0)
            assert not layer.alpha_B[:, k:].any()   # past the rank: "lora" columns
            if rank > k:
                assert 0.2 < float(layer.alpha_A[:, k:].abs().max()) <= 0.5
            lin = copy.deepcopy(layer.base).double()
            close(layer.double()(x), lin(x) + x @ got.T, atol=1e-5 * float(S[0]), rtol=0)   # the forward agrees
            layer.float()
    with pytest.raises(ValueError, match="init='project' takes the adapter to project as source="):
        eigenlorax.apply(Toy(), sub, 2, init="project")
    with pytest.raises(ValueError, match="source only goes with it"):
        eigenlorax.apply(Toy(), sub, 2, source=src)
    part = make_adapter({"enc.q": (48, 40)}, 4, lambda mod, m, n: (torch.randn(m, 4), torch.randn(4, n)))
    model = Toy()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="layer enc.v: no module enc.v in the source adapter"):
        eigenlorax.apply(model, sub, 2, init="project", source=part)
    wrong = make_adapter({"enc.q": (48, 40), "enc.v": (40, 32)}, 4,
                         lambda mod, m, n: (torch.randn(m, 4), torch.randn(4, n)))
    with pytest.raises(ValueError, match=r"source: layer enc.v is a 40 out x 32 in update, the subspace's enc.v "
                                         r"is 32 out x 40 in"):
        eigenlorax.apply(model, sub, 2, init="project", source=wrong)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())   # nothing changed
    assert not any(isinstance(mod, eigenlorax.EigenLinear) for mod in model.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_apply_to_model_on_cuda():
    """A model already on the GPU: the loadings must live there too (and train there)."""
    sub = toy_subspace()
    base = Toy()
    cpu, gpu = copy.deepcopy(base), copy.deepcopy(base).cuda()
    em_cpu = eigenlorax.apply(cpu, sub, 4, init="uniform", seed=3)
    em = eigenlorax.apply(gpu, sub, 4, init="uniform", seed=3)
    assert all(p.is_cuda for p in gpu.parameters()), "loadings left on the CPU"
    em.load_coefficients(em_cpu.coefficients())
    x = torch.randn(5, 40)
    with torch.no_grad():
        close(gpu(x.cuda()).cpu(), cpu(x), atol=1e-4, rtol=1e-4)
    gpu(x.cuda()).sum().backward()
    assert all(l.alpha_A.grad is not None for l in em.layers.values())


# ---------------------------------------------------------------------------------------------
# merge / unmerge, task switching, export


def test_merge_unmerge_roundtrip():
    sub = toy_subspace(augment=2)
    model = Toy()
    w0 = {m: dict(model.named_modules())[m].weight.detach().clone() for m in TOY_LAYERS}
    em = eigenlorax.apply(model, sub, 4, scaling=1.3)
    randomize(em, 0)
    x = torch.randn(6, 40)
    with torch.no_grad():
        y = model(x)
        em.merge()
        em.merge()   # idempotent
        for m in TOY_LAYERS:
            assert em.layers[m].merged
            assert (em.layers[m].base.weight - w0[m]).abs().max() > 1e-3
        close(model(x), y, atol=1e-4, rtol=1e-5)
        em.unmerge()
        em.unmerge()
        for m in TOY_LAYERS:
            close(em.layers[m].base.weight, w0[m], atol=1e-5, rtol=0)
        close(model(x), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merge_rounds_once_and_unmerge_restores_the_bits(dtype, tmp_path):
    """A bfloat16 W += ΔW rounded ΔW, then the sum; unmerge subtracted and rounded again, so one merge + unmerge
    changed 6% of a bfloat16 MiniLM's adapted entries and task switches while merged drifted the base (2% of
    an update after 100; float32 kept no copy and drifted linearly, 4.5% of the update's largest entry after
    8,000). Now the merged weight is one rounding of W + ΔW, unmerge gives W back bit for bit, switches do not
    drift; a weight changed since the merge (a state dict loaded) falls back to subtracting, as merge(keep=False)
    does, which a task switch's re-merge keeps to (it kept a copy again)."""
    sub = toy_subspace(augment=2)
    model = Toy().to(dtype)
    w0 = {m: dict(model.named_modules())[m].weight.detach().clone() for m in TOY_LAYERS}
    em = eigenlorax.apply(model, sub, 4, scaling=1.3, check_base=False)
    task_a = em.coefficients()
    randomize(em, 1)
    task_b = em.coefficients()
    em.load_coefficients(task_a)
    exact = {}
    for m, l in em.layers.items():
        B, A = l.lora_factors()
        exact[m] = (w0[m].double() + 1.3 * B.double() @ A.double()).to(dtype)
    em.merge()
    for m, l in em.layers.items():   # one rounding: the float32 sum rounds differently from float64 in 0-0.1% of
        if dtype == torch.float32:     # entries here; double rounding: 17-23% (float32: ΔW is float32's own)
            close(l.base.weight, exact[m], atol=1e-6, rtol=1e-6)
        else:
            assert (l.base.weight != exact[m]).float().mean() < 1e-2, m
    for _ in range(10):
        em.load_coefficients(task_b)
        em.load_coefficients(task_a)
    em.unmerge()
    assert all(torch.equal(em.layers[m].base.weight, w0[m]) for m in TOY_LAYERS)
    em.merge()
    state = copy.deepcopy(model.state_dict())
    em.unmerge()
    model.load_state_dict(state)   # merged weights from a state dict: no kept copy, the update is subtracted
    assert all(l.merged and l._unmerged is None for l in em.layers.values())
    em.unmerge()
    for m in TOY_LAYERS:
        close(em.layers[m].base.weight.float(), w0[m].float(), atol=2e-2, rtol=0)
    em.merge(keep=False)
    em.load_coefficients(task_b)
    assert all(l.merged and l._unmerged is None for l in em.layers.values())
    em.merge()
    plain = em.unload()   # merged for good: nothing kept
    assert all(dict(plain.named_modules())[m].weight.dtype == dtype for m in TOY_LAYERS)


def test_apply_keeps_the_models_mode_and_sees_through_wrappers():
    """apply() on a model in eval mode (as from_pretrained gives it) put the new layers in training mode, so
    a forward after merge() raised 'loadings would get no gradient'; and on torch.compile(model) it found no
    module (the names carry _orig_mod.)."""
    model = Toy().eval()
    em = eigenlorax.apply(torch.compile(model), toy_subspace(), 4)
    assert set(em.layers) == set(TOY_LAYERS) and not any(l.training for l in em.layers.values())
    randomize(em, 1)
    x = torch.randn(3, 40)
    y = model(x)
    em.merge()
    close(model(x), y, atol=1e-4, rtol=1e-5)   # inference while merged, no error


def test_saving_warns_about_parameters_unfrozen_after_apply(tmp_path):
    """A head unfrozen by hand after apply() (not apply(trainable=...)) was trained and then left out of the
    task file and the peft export without a word."""
    model = Toy()
    em = eigenlorax.apply(model, toy_subspace(), 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        em.save_coefficients(str(tmp_path / "t.safetensors"))   # nothing unfrozen: no warning
    model.head.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"2 parameter\(s\) require grad but are not saved.*head.weight"):
        em.save_coefficients(str(tmp_path / "t.safetensors"))
    with pytest.warns(UserWarning, match="apply\\(trainable="):
        em.export_peft(str(tmp_path / "peft"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # extra given: the caller chose what goes with the task
        em.save_coefficients(str(tmp_path / "t.safetensors"), extra={})


def test_merge_of_a_tied_weight_is_refused():
    """GPT-2's lm_head is its input embedding: merging the update into it changed the embedding too
    (logits off by 0.27). The unmerged model is right, and merge / unload(merge=True) are refused before
    any layer is merged."""
    sub = toy_subspace()
    model = Toy()
    model.other = torch.nn.Linear(40, 32)
    model.other.weight = model.enc.v.weight   # tied, as transformers ties an output embedding
    em = eigenlorax.apply(model, sub, 4)
    randomize(em, 0)
    w0 = {m: em.layers[m].base.weight.detach().clone() for m in TOY_LAYERS}
    for call, what in ((em.merge, "merge"), (em.unload, "unload")):
        with pytest.raises(ValueError, match=rf"enc.v: its weight is tied to other.weight .*: {what}"):
            call()
        assert not any(l.merged for l in em.layers.values())
        assert all(torch.equal(em.layers[m].base.weight, w0[m]) for m in TOY_LAYERS)
    plain = em.unload(merge=False)   # the original layers back, nothing folded in
    assert torch.equal(plain.enc.v.weight, w0["enc.v"]) and plain.other.weight is plain.enc.v.weight


def test_an_unloaded_handle_refuses_every_call(tmp_path):
    """unload() returns the plain model and empties the handle: each call names that (save_coefficients raised a
    bare StopIteration after a false warning, load_coefficients blamed the architecture, merge did nothing)."""
    model = Toy()
    em = eigenlorax.apply(model, toy_subspace(), 2, trainable="head")
    task = str(tmp_path / "t.safetensors")
    em.save_coefficients(task)
    assert em.unload() is model
    for call in (lambda: em.save_coefficients(str(tmp_path / "u.safetensors")), lambda: em.load_coefficients(task),
                 em.merge, em.unmerge, em.unload, em.coefficients, em.coefficient_count, em.trainable_parameters,
                 em.extra, lambda: em.export_peft(str(tmp_path / "peft"))):
        with pytest.raises(RuntimeError, match=r"this EigenModel was unloaded \(unload\(\) returned the plain model\)"):
            call()
    assert sorted(os.listdir(tmp_path)) == ["t.safetensors"]


def test_a_folder_given_for_a_file_or_a_file_for_a_folder_is_named(tmp_path):
    """(The rename failed with a raw IsADirectoryError naming the temporary file; a file as a folder raised a bare
    FileExistsError.) Nothing is written or left behind."""
    em = eigenlorax.apply(Toy(), toy_subspace(), 2)
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(IsADirectoryError, match=re.escape(f"{tmp_path / 'd'}: is a folder, and a file is written "
                                                          f"here: give a file's path (e.g. {tmp_path / 'd'}/")):
        em.save_coefficients(str(tmp_path / "d"))
    with pytest.raises(NotADirectoryError, match=re.escape(f"{tmp_path / 'f'}: is a file, and a peft adapter writes "
                                                           "a folder")):
        em.export_peft(str(tmp_path / "f"))
    assert sorted(os.listdir(tmp_path)) == ["d", "f"] and not os.listdir(tmp_path / "d")
    assert (tmp_path / "f").read_bytes() == b"x"


def test_task_switch_with_coefficients(tmp_path):
    """A switch restores everything saved with the task: loadings, the head apply(trainable=) unfroze
    (saved by default) and the scaling it was trained with, merged or not."""
    sub = toy_subspace()
    model = Toy()
    em = eigenlorax.apply(model, sub, 4, trainable=("head",))
    assert em.extra_names == ["head.weight", "head.bias"]
    x = torch.randn(6, 40)
    outs, files = [], []
    for t in range(2):
        randomize(em, 10 + t)
        for l in em.layers.values():
            l.scaling = 1.0 + t   # task 1 trained with another scaling
        with torch.no_grad():
            model.head.weight.normal_()
            outs.append(model(x).clone())
        f = str(tmp_path / f"task{t}.safetensors")
        em.save_coefficients(f)   # extra defaults to the head
        files.append(f)
    assert (outs[0] - outs[1]).abs().max() > 1e-2
    with torch.no_grad():
        for t in (0, 1, 0):
            extra = em.load_coefficients(files[t])
            assert sorted(extra) == ["head.bias", "head.weight"]
            close(model(x), outs[t], atol=1e-6, rtol=1e-6)
        em.merge()   # switching while merged keeps the weights consistent
        for t in (1, 0):
            em.load_coefficients(files[t])
            close(model(x), outs[t], atol=1e-4, rtol=1e-5)
        em.unmerge()
        close(model(x), outs[0], atol=1e-5, rtol=1e-5)
        head = model.head.weight.clone()
        em.load_coefficients(files[1], restore_extra=False)   # the caller keeps its head
        assert torch.equal(model.head.weight, head)


def test_task_extra_not_in_model_refused_before_any_change(tmp_path):
    sub = toy_subspace()
    em = eigenlorax.apply(Toy(), sub, 4)
    randomize(em, 1)
    f = str(tmp_path / "t.safetensors")
    em.save_coefficients(f, extra={"head.weight": torch.randn(2, 80), "classifier.weight": torch.randn(2, 80)})
    g = str(tmp_path / "g.safetensors")
    em.save_coefficients(g, extra={"head.weight": torch.randn(3, 80)})
    target = eigenlorax.apply(Toy(), sub, 4)
    before = {k: v.clone() for k, v in target.coefficients().items()}
    head = target.model.head.weight.clone()
    with pytest.raises(FormatError, match="classifier.weight has no parameter"):
        target.load_coefficients(f)
    with pytest.raises(FormatError, match=r"head.weight is \(3, 80\) but the model's is \(2, 80\)"):
        target.load_coefficients(g)
    assert all(torch.equal(v, before[k]) for k, v in target.coefficients().items())
    assert torch.equal(target.model.head.weight, head)
    extra = target.load_coefficients(f, restore_extra=False)
    assert sorted(extra) == ["classifier.weight", "head.bias", "head.weight"]   # head completed from the model


class Layered(torch.nn.Module):
    """``layers`` blocks of q/v Linears under ``enc.layer.<i>``."""

    def __init__(self, layers):
        super().__init__()
        self.enc = torch.nn.Module()
        self.enc.layer = torch.nn.ModuleList()
        for _ in range(layers):
            blk = torch.nn.Module()
            blk.q, blk.v = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
            self.enc.layer.append(blk)


def test_module_mapping_is_one_prefix_rewrite():
    """A subspace of ``model.enc.layer.{0,1}`` adapters applies to a model named ``enc.layer...`` (one
    prefix dropped), but not to a 1-layer model: layer 1's only match there ("q" of layer 0) is refused."""
    layers = {f"model.enc.layer.{i}.{p}": (16, 16) for i in range(2) for p in ("q", "v")}
    sub = eigenlorax.build_subspace(random_adapters(layers, 3, 2), components=3)
    em = eigenlorax.apply(Layered(2), sub, 2)
    assert sorted(em.layers) == sorted(k[len("model."):] for k in layers)
    one = Layered(1)
    w = one.enc.layer[0].q.weight.clone()
    with pytest.raises(ValueError, match=r"layer model.enc.layer.1.q: no module enc.layer.1.q in the model"):
        eigenlorax.apply(one, sub, 2)
    assert isinstance(one.enc.layer[0].q, torch.nn.Linear) and torch.equal(one.enc.layer[0].q.weight, w)
    assert eigenlorax._map_modules(["a.x.q", "a.y.q"], ["x.q", "y.q"], "m") == {"a.x.q": "x.q", "a.y.q": "y.q"}


def test_unload_and_state_dict_keep_the_update(tmp_path):
    sub = toy_subspace()
    model = Toy()
    em = eigenlorax.apply(model, sub, 4)
    randomize(em, 3)
    x = torch.randn(5, 40)
    with torch.no_grad():
        y = model(x)
        assert em.layers["enc.q"].weight is em.layers["enc.q"].base.weight   # like peft's layers
        em.merge()
        merged_state = copy.deepcopy(model.state_dict())
        em.unmerge()
        unmerged_state = copy.deepcopy(model.state_dict())
        for state, merged in ((merged_state, True), (unmerged_state, False)):
            for start_merged in (False, True):   # neither counts the update twice nor drops it
                fresh = Toy()
                fem = eigenlorax.apply(fresh, sub, 4)
                if start_merged:
                    fem.merge()
                fresh.load_state_dict(state)
                assert fem.layers["enc.q"].merged is merged
                close(fresh(x), y, atol=1e-5, rtol=1e-5)
        plain = em.unload()
        assert plain is model and type(model.enc.q) is torch.nn.Linear and type(model.enc.v) is torch.nn.Linear
        assert all(p.requires_grad for p in model.parameters())   # as before apply
        close(model(x), y, atol=1e-5, rtol=1e-5)
        assert set(model.state_dict()) == set(Toy().state_dict())
    with pytest.raises(RuntimeError, match="unloaded"):
        em.export_peft(str(tmp_path / "x"))


def test_training_while_merged_is_refused():
    model = Toy()
    em = eigenlorax.apply(model, toy_subspace(), 4)
    em.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        model(torch.randn(2, 40)).sum().backward()
    model.eval()
    model(torch.randn(2, 40))   # inference while merged is what merge is for
    em.unmerge()
    model.train()
    model(torch.randn(2, 40)).sum().backward()
    assert em.layers["enc.q"].alpha_A.grad is not None


def test_apply_twice_or_to_a_peft_model_says_so():
    from peft import LoraConfig, get_peft_model
    sub = toy_subspace()
    model = Toy()
    eigenlorax.apply(model, sub, 4)
    with pytest.raises(ValueError, match="already an EigenLoRAx layer"):
        eigenlorax.apply(model, sub, 4)
    pm = get_peft_model(Toy(), LoraConfig(r=2, target_modules=["q", "v"]))
    with pytest.raises(ValueError, match="peft adapter layer.*not to a PeftModel"):
        eigenlorax.apply(pm, sub, 4)


def test_export_task_refuses_a_task_missing_layers(tmp_path):
    sub = toy_subspace()
    em = eigenlorax.apply(Toy(), sub, 4)
    coef = {k: v for k, v in em.coefficients().items() if k.startswith("enc.q")}
    with pytest.raises(FormatError, match=r"no loadings for the subspace's \['enc.v'\]"):
        eigenlorax.export_task(sub, coef, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_load_coefficients_rejects_other_shape(tmp_path):
    sub = toy_subspace()
    other = eigenlorax.apply(Toy(), sub, 2)   # rank 2
    f = str(tmp_path / "r2.safetensors")
    other.save_coefficients(f)
    em = eigenlorax.apply(Toy(), sub, 4)
    with pytest.raises(FormatError, match="alpha_A"):
        em.load_coefficients(f)
    other_sub = toy_subspace(components=3)
    em3 = eigenlorax.apply(Toy(), other_sub, 4)
    with pytest.raises(FormatError):
        em3.load_coefficients(em.coefficients())
    with pytest.raises(FormatError, match="no loadings"):
        em.load_coefficients({})


def test_task_from_another_subspace_of_the_same_size_is_refused(tmp_path):
    """Two subspaces with the same K: a task trained on one fits the other's shapes exactly, so only
    the subspace digest recorded in the task file tells them apart."""
    sub, other = toy_subspace(), toy_subspace()
    em = eigenlorax.apply(Toy(), sub, 4)
    f = str(tmp_path / "task.safetensors")
    em.save_coefficients(f)
    assert safe_open(f, framework="pt").metadata()["subspace"] == sub.digest()
    path = str(tmp_path / "sub.safetensors")
    sub.save(path)
    assert EigenSubspace.load(path).digest() == sub.digest()  # survives a save and a load
    wrong = eigenlorax.apply(Toy(), other, 4)
    before = {k: v.clone() for k, v in wrong.coefficients().items()}
    with pytest.raises(FormatError, match="trained on another subspace"):
        wrong.load_coefficients(f)
    assert all(torch.equal(v, before[k]) for k, v in wrong.coefficients().items())
    with pytest.raises(FormatError, match="trained on another subspace"):
        eigenlorax.export_task(other, f, str(tmp_path / "export"))
    assert not (tmp_path / "export").exists()
    eigenlorax.apply(Toy(), EigenSubspace.load(path), 4).load_coefficients(f)  # the right one loads


def test_rejected_load_leaves_model_unchanged():
    """A rejected switch (only the last layer's loadings have the wrong shape) must not leave the
    model half switched to the new task."""
    sub = toy_subspace()
    model = Toy()
    em = eigenlorax.apply(model, sub, 4)
    randomize(em, 1)
    new = em.coefficients()
    randomize(em, 2)
    x = torch.randn(4, 40)
    with torch.no_grad():
        y = model(x)
    last = list(em.layers)[-1]
    new[f"{last}.alpha_B"] = torch.zeros(3, 4)
    with pytest.raises(FormatError):
        em.load_coefficients(new)
    with torch.no_grad():
        close(model(x), y, atol=0, rtol=0)


def test_export_peft_loads_in_peft_and_export_task_matches(tmp_path, minilm, minilm_subspace):
    tok, scaling = minilm[1], 2.0
    model, em, head = trained_head_task(minilm, minilm_subspace, scaling)
    out = str(tmp_path / "exported")
    ad = em.export_peft(out, extra=head, task_type="SEQ_CLS")
    assert os.path.isfile(os.path.join(out, io.ADAPTER_CONFIG)) and os.path.isfile(os.path.join(out, io.ADAPTER_WEIGHTS))
    enc, _ = train.encode(tok, [(w, 0) for w in WORDS])
    y = logits(model, enc)
    peft_model, _ = train.load_adapter_model(out, seed=1)   # another random head in the base model
    close(logits(peft_model, enc), y, atol=1e-5, rtol=1e-5)
    # the exported factors are the loadings mapped through the components; scaling via lora_alpha
    for u in PeftAdapter.load(out).updates():
        assert u.scaling == pytest.approx(scaling)
        B, A = em.layers[u.module].lora_factors()
        close(u.B, B, atol=1e-6)
        close(u.A, A, atol=1e-6)
    # export_task: subspace file + coefficients file -> the same adapter, no model needed
    sub_path, coef = str(tmp_path / "sub.safetensors"), str(tmp_path / "task.safetensors")
    minilm_subspace.save(sub_path)
    em.save_coefficients(coef, extra=head)
    out2 = str(tmp_path / "from_files")
    eigenlorax.export_task(EigenSubspace.load(sub_path), coef, out2, scaling=scaling, task_type="SEQ_CLS")
    a1, a2 = PeftAdapter.load(out), PeftAdapter.load(out2)
    assert set(a1.tensors) == set(a2.tensors) == set(ad.tensors)
    for k in a1.tensors:
        close(a2.tensors[k], a1.tensors[k], atol=1e-7, rtol=1e-6)
    assert a2.config["r"] == a1.config["r"] == 8
    assert a2.config["lora_alpha"] == pytest.approx(a1.config["lora_alpha"])
    # extras already keyed as peft saves them (base_model.model.classifier.weight): the same folder
    prefixed = eigenlorax.export_task(EigenSubspace.load(sub_path), {**em.coefficients(), **{
        f"extra.{PEFT_PREFIX}{k}": v for k, v in head.items()}}, str(tmp_path / "prefixed"), scaling=scaling,
        task_type="SEQ_CLS")
    assert prefixed.config == a2.config and set(prefixed.tensors) == set(a2.tensors)


@pytest.mark.parametrize("task_type", ["recorded", "argument", "none"])
def test_export_task_head_loads_in_peft(task_type, tmp_path, minilm, minilm_subspace):
    """`eigen export` of a task saved as the README and the demo save it (head under its model name,
    ``classifier.weight``): PeftModel.from_pretrained must load the trained head, not keep the base
    model's random one, and give the EigenLoRAx model's logits."""
    tok = minilm[1]
    model, em, head = trained_head_task(minilm, minilm_subspace)
    coef, sub_path, out = str(tmp_path / "task.safetensors"), str(tmp_path / "sub.safetensors"), str(tmp_path / "out")
    em.save_coefficients(coef, extra=head, task_type="SEQ_CLS" if task_type == "recorded" else None)
    minilm_subspace.save(sub_path)
    ad = eigenlorax.export_task(EigenSubspace.load(sub_path), coef, out,
                                task_type="SEQ_CLS" if task_type == "argument" else None)
    with open(os.path.join(out, io.ADAPTER_CONFIG)) as f:
        cfg = json.load(f)
    assert cfg["modules_to_save"] == ["classifier"]
    assert cfg["task_type"] == (None if task_type == "none" else "SEQ_CLS")
    assert set(ad.extra_tensors()) == {f"{PEFT_PREFIX}classifier.weight", f"{PEFT_PREFIX}classifier.bias"}
    peft_model, _ = train.load_adapter_model(out, seed=1)   # the base model's head: another random one
    assert type(peft_model).__name__ == ("PeftModel" if task_type == "none" else "PeftModelForSequenceClassification")
    loaded = peft_model.get_submodule("base_model.model.classifier.modules_to_save.default")
    assert torch.equal(loaded.weight, model.classifier.weight) and torch.equal(loaded.bias, model.classifier.bias)
    enc, _ = train.encode(tok, [(w, 0) for w in WORDS])
    close(logits(peft_model, enc), logits(model, enc), atol=1e-5, rtol=1e-5)


def tiny_roberta(seed=0):
    """A 2-layer RoBERTa classifier built from its config (no files): its head is a module with two Linears
    (classifier.dense, classifier.out_proj), and peft's SEQ_CLS model wraps ``classifier`` whole."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    cfg = RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=40, num_labels=3)
    return RobertaForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("task_type", ["SEQ_CLS", None])
@pytest.mark.parametrize("trainable", [("classifier",), ("classifier.out_proj",), ("embeddings.LayerNorm.bias",)])
def test_export_of_nested_heads_and_partial_modules_loads_in_peft(trainable, task_type, tmp_path):
    """peft restores a modules_to_save module whole (every tensor of its state dict must be in the file)
    and its SEQ_CLS model wraps ``classifier`` itself: a RoBERTa head (classifier.dense + out_proj),
    half of it, or a LayerNorm's bias alone must export to a folder that PeftModel loads into the
    trained model, through export_peft and through a task file + export_task."""
    from peft import PeftModel

    layers = {f"roberta.encoder.layer.{i}.attention.self.{p}": (32, 32) for i in range(2) for p in ("query", "value")}
    sub = eigenlorax.build_subspace(random_adapters(layers, 3, 2), components=4)
    base = tiny_roberta()
    model = copy.deepcopy(base)
    em = eigenlorax.apply(model, sub, 2, trainable=trainable)
    randomize(em, 1)
    with torch.no_grad():
        for n in em.extra_names:
            model.get_parameter(n).add_(torch.randn_like(model.get_parameter(n)))
    x = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        want = model(input_ids=x).logits
    head = trainable[0] != "embeddings.LayerNorm.bias"
    coef = str(tmp_path / "task.safetensors")
    kind = task_type   # SEQ_CLS without a trained head: peft loads the model's own, saved beside the rest
    em.save_coefficients(coef, task_type=kind)
    for out, write in ((tmp_path / "direct", lambda o: em.export_peft(o, task_type=kind)),
                       (tmp_path / "files", lambda o: eigenlorax.export_task(sub, coef, o))):
        write(str(out))
        with open(out / io.ADAPTER_CONFIG) as f:
            saved = json.load(f)["modules_to_save"]
        if kind == "SEQ_CLS":
            assert saved == ["classifier"] + ([] if head else ["roberta.embeddings.LayerNorm"])
        elif head:   # peft wraps just the listed modules: what was trained
            assert saved == ["classifier.out_proj"] if "out_proj" in trainable[0] else \
                ["classifier.dense", "classifier.out_proj"]
        else:
            assert saved == ["roberta.embeddings.LayerNorm"]
        other = copy.deepcopy(base)
        if head:   # the base model's head is random: the trained one must come from the folder
            with torch.no_grad():
                for p in other.get_submodule(trainable[0]).parameters():
                    p.normal_()
        loaded = PeftModel.from_pretrained(other, str(out)).eval()
        with torch.no_grad():
            close(loaded(input_ids=x).logits, want, atol=1e-5)
    if head and kind:   # a caller's extra= with half of the head peft wraps: completed from the model as well
        part = {k: v for k, v in em.extra().items() if "out_proj" in k}
        ad = em.export_peft(str(tmp_path / "part"), extra=part, task_type=kind)
        assert {k[len(PEFT_PREFIX):] for k in ad.extra_tensors()} == {
            f"classifier.{m}.{p}" for m in ("dense", "out_proj") for p in ("weight", "bias")}


def test_heads_peft_does_not_wrap_and_tensors_outside_modules_are_saved_as_they_are(tmp_path):
    """peft's SEQ_CLS model wraps only modules named classifier / score: another head (BART's
    classification_head) exports as plain modules_to_save; a parameter of the model itself (a
    temperature) and a BatchNorm's buffers (0-dim num_batches_tracked) go into the task file."""
    class Headed(Toy):
        def __init__(self):
            super().__init__()
            self.classification_head = torch.nn.Sequential(torch.nn.Linear(80, 6), torch.nn.BatchNorm1d(6),
                                                           torch.nn.Linear(6, 2))
            self.temperature = torch.nn.Parameter(torch.ones(()))

    sub = toy_subspace()
    model = Headed()
    em = eigenlorax.apply(model, sub, 2, trainable=("classification_head", "temperature", "score"))
    randomize(em, 2)
    with torch.no_grad():
        model.temperature.fill_(0.5)
        model.classification_head[1].running_mean.normal_()
        model.classification_head[1].num_batches_tracked.fill_(7)
    coef = str(tmp_path / "task.safetensors")
    em.save_coefficients(coef, task_type="SEQ_CLS")
    saved = set(eigenlorax._read_task(coef)[0])
    assert {"extra.temperature", "extra.classification_head.1.num_batches_tracked",
            "extra.classification_head.0.weight"} <= saved
    other = eigenlorax.apply(Headed(), sub, 2, trainable=("classification_head", "temperature"))
    other.load_coefficients(coef)
    assert float(other.model.temperature) == 0.5 and int(other.model.classification_head[1].num_batches_tracked) == 7
    assert torch.equal(other.model.classification_head[1].running_mean, model.classification_head[1].running_mean)
    with pytest.raises(ValueError, match="extra tensor temperature: peft can only restore"):
        em.export_peft(str(tmp_path / "x"), task_type="SEQ_CLS")   # peft has no place for a model's own tensor
    ad = em.export_peft(str(tmp_path / "y"), extra={k: v for k, v in em.extra().items() if k != "temperature"},
                        task_type="SEQ_CLS")
    assert ad.config["modules_to_save"] == [f"classification_head.{i}" for i in range(3)]   # each whole


def test_export_saves_every_module_peft_end_matches_and_refuses_nested_wrappers(tmp_path):
    """peft wraps every module whose name ends with a modules_to_save entry: a saved ``classifier`` makes it
    wrap DistilBERT's ``pre_classifier`` too, which must then be in the folder; a module named like a head
    inside the trained module would be a wrapper inside a wrapper, which peft cannot load."""
    from peft import PeftModel

    class Distil(Toy):
        def __init__(self):
            super().__init__()
            self.pre_classifier, self.classifier = torch.nn.Linear(80, 80), torch.nn.Linear(80, 2)

        def forward(self, x):
            h = torch.cat([getattr(self.enc, self.q_name)(x), self.enc.v(x)], -1)
            return self.classifier(torch.relu(self.pre_classifier(h)))

    sub = toy_subspace()
    torch.manual_seed(3)
    base = Distil()
    model = copy.deepcopy(base)
    em = eigenlorax.apply(model, sub, 2)
    randomize(em, 4)
    with torch.no_grad():
        model.classifier.weight.normal_()
    x = torch.randn(5, 40)
    with torch.no_grad():
        want = model(x)
    ad = em.export_peft(str(tmp_path / "out"), extra={"classifier.weight": model.classifier.weight,
                                                      "classifier.bias": model.classifier.bias})
    assert ad.config["modules_to_save"] == ["classifier", "pre_classifier"]
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out")).eval()
    with torch.no_grad():
        close(loaded(x), want, atol=1e-5)

    class Nested(Toy):
        def __init__(self):
            super().__init__()
            self.top = torch.nn.Module()
            self.top.scale = torch.nn.Parameter(torch.ones(2))
            self.top.classifier = torch.nn.Linear(2, 2)

    em = eigenlorax.apply(Nested(), sub, 2, trainable=("top",))
    em.export_peft(str(tmp_path / "plain"))   # no task type: peft wraps top alone
    with pytest.raises(ValueError, match="peft would wrap top.classifier inside top"):
        em.export_peft(str(tmp_path / "seq"), task_type="SEQ_CLS")
    assert not os.path.exists(tmp_path / "seq")

    class HeadAdapted(Toy):   # the subspace adapts a module peft's SEQ_CLS model would wrap as the head
        def __init__(self):
            super().__init__(q_name="classifier")
            self.ln = torch.nn.LayerNorm(80)

    head_sub = eigenlorax.build_subspace(random_adapters({"enc.classifier": (48, 40), "enc.v": (32, 40)}, 3, 4),
                                         components=4)
    em = eigenlorax.apply(HeadAdapted(), head_sub, 2, trainable=("ln.bias",))
    for write in (lambda: em.export_peft(str(tmp_path / "h"), task_type="SEQ_CLS"),
                  lambda: em.save_coefficients(str(tmp_path / "h.safetensors"), task_type="SEQ_CLS")):
        with pytest.raises(ValueError, match="peft would wrap enc.classifier .* the adapted layer enc.classifier"):
            write()
    assert not os.path.exists(tmp_path / "h") and not os.path.exists(tmp_path / "h.safetensors")
    em.export_peft(str(tmp_path / "h"))   # no task type: peft wraps just ln


def test_export_task_warns_about_a_task_file_from_before_whole_modules(tmp_path):
    sub_path, coef, em = saved_toy_task(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # a file of this build: no warning
        eigenlorax.export_task(EigenSubspace.load(sub_path), coef, str(tmp_path / "a"))
    with pytest.warns(UserWarning, match="saved for task_type None, exported as SEQ_CLS, .* holds none"):
        eigenlorax.export_task(EigenSubspace.load(sub_path), pathlib.Path(coef), str(tmp_path / "c"),
                               task_type="SEQ_CLS")   # the toy's head is "head": peft's SEQ_CLS head is not saved
    rewrite(coef, extra=None, digest=None)   # as an older build wrote it
    with pytest.warns(UserWarning, match="written by an older subspace_ext, which saved only the trained tensors"):
        eigenlorax.export_task(EigenSubspace.load(sub_path), coef, str(tmp_path / "b"))
    assert set(em.load_coefficients(pathlib.Path(coef))) == {"head.weight", "head.bias"}


def test_trainable_patterns_are_checked_before_apply_changes_anything():
    sub = toy_subspace()
    model = Toy()
    before = copy.deepcopy(model.state_dict())
    for pattern, message in ((("clasifier", "scor"), r"patterns \['clasifier', 'scor'\] match no parameter"),
                             (("bias",), r"enc\.q\.bias lies in or beside the adapted layer enc\.q"),
                             (("enc.v",), r"enc\.v\.weight lies in or beside the adapted layer enc\.v"),
                             (("head", ""), "non-empty str")):
        with pytest.raises(ValueError, match=message):
            eigenlorax.apply(model, sub, 2, trainable=pattern)
        assert isinstance(model.enc.q, torch.nn.Linear) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    em = eigenlorax.apply(model, sub, 2, trainable="head")   # one str is one pattern, not its letters
    em.unload()
    em = eigenlorax.apply(model, sub, 2, trainable=("head", "score"))   # one pattern may miss
    assert em.extra_names == ["head.weight", "head.bias"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "head.weight", "head.bias", *(f"{m}.alpha_{s}" for m in TOY_LAYERS for s in "AB")}


def test_export_task_refuses_loadings_of_several_ranks(tmp_path):
    sub = toy_subspace()
    t = eigenlorax.apply(Toy(), sub, 2).coefficients()
    t["enc.v.alpha_A"], t["enc.v.alpha_B"] = torch.randn(6, 3), torch.randn(6, 3)
    with pytest.raises(FormatError, match=r"enc\.v: loadings of rank 3 beside rank 2"):
        eigenlorax.export_task(sub, t, str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")


def test_task_types_are_peft_ones():
    from peft import TaskType

    assert set(eigenlorax.TASK_TYPES) == {t.value for t in TaskType}
    em = eigenlorax.apply(Toy(), toy_subspace(), 2)
    with pytest.raises(ValueError, match="task_type"):
        em.export_peft("unused", task_type="seq_cls")


def test_extra_must_be_a_module_outside_the_lora_layers(tmp_path):
    em = eigenlorax.apply(Toy(), toy_subspace(), 2)
    for key in ("scale", "enc.q.bias"):   # no module / a LoRA layer: peft could not restore it
        with pytest.raises(ValueError, match=key):
            em.export_peft(str(tmp_path / "x"), extra={key: torch.ones(3)})
    assert not os.path.exists(tmp_path / "x")


# ---------------------------------------------------------------------------------------------
# integrity: digests, non-finite values


def saved_toy_task(tmp_path):
    """(subspace file, task file) of a toy task, and the task's coefficients."""
    sub = toy_subspace(augment=2)
    em = eigenlorax.apply(Toy(), sub, 3, scaling=0.5)
    randomize(em, 3)
    sub_path, coef = str(tmp_path / "sub.safetensors"), str(tmp_path / "task.safetensors")
    sub.save(sub_path)
    em.save_coefficients(coef, extra={"head.weight": torch.randn(2, 80)})
    return sub_path, coef, em


@pytest.mark.parametrize("which", ["subspace", "coefficients"])
def test_corrupt_file_refused(which, tmp_path):
    """4 overwritten bytes in the tensor data (a finite float: only the digest can tell)."""
    sub_path, coef, em = saved_toy_task(tmp_path)
    path = sub_path if which == "subspace" else coef
    data = bytearray(pathlib.Path(path).read_bytes())
    new = struct.pack("<f", 0.123456)
    assert data[-4:] != new
    data[-4:] = new
    pathlib.Path(path).write_bytes(bytes(data))
    with pytest.raises(FormatError, match=rf"{path}: corrupt file"):
        eigenlorax.export_task(EigenSubspace.load(sub_path), coef, str(tmp_path / "out"))
    if which == "coefficients":
        with pytest.raises(FormatError, match="corrupt file"):
            em.load_coefficients(coef)
    assert not os.path.exists(tmp_path / "out")


def test_digest_covers_metadata(tmp_path):
    sub_path, coef, em = saved_toy_task(tmp_path)
    rewrite(coef, scaling="3.0")
    with pytest.raises(FormatError, match="corrupt file"):
        em.load_coefficients(coef)
    meta = json.loads(safe_open(sub_path, framework="pt").metadata()["eigenlorax"])
    meta["n_pc"]["A"][0] -= 1
    rewrite(sub_path, eigenlorax=json.dumps(meta))
    with pytest.raises(FormatError, match="corrupt file"):
        EigenSubspace.load(sub_path)


def test_files_without_digest_still_load(tmp_path):
    """Files written before digests were added."""
    sub_path, coef, em = saved_toy_task(tmp_path)
    expected = eigenlorax.export_task(EigenSubspace.load(sub_path), coef, str(tmp_path / "a"))
    rewrite(sub_path, digest=None)
    rewrite(coef, digest=None)
    assert "digest" not in safe_open(coef, framework="pt").metadata()
    got = eigenlorax.export_task(EigenSubspace.load(sub_path), coef, str(tmp_path / "b"))
    assert got.config == expected.config
    assert all(torch.equal(got.tensors[k], v) for k, v in expected.tensors.items())
    assert set(em.load_coefficients(coef)) == {"head.weight", "head.bias"}   # the module whole


SUBSPACE_EDITS = {  # edit of a subspace file (digest dropped: as an older file or a deliberate edit) -> message
    "meta-null": (lambda t, m: "null", "not a JSON object"),
    "modules-empty": (lambda t, m: dict(m, modules=[]), "modules must be a non-empty list"),
    "modules-duplicate": (lambda t, m: dict(m, modules=[m["modules"][0]] * 2), "distinct module names"),
    "P-float64": (lambda t, m: t.update({"A.0.P": t["A.0.P"].double()}) or m, "A.0.P must be a float32"),
    "P-0-dim": (lambda t, m: t.update({"B.1.P": torch.tensor(1.0)}) or m, "B.1.P must be a float32"),
    "P-not-orthonormal": (lambda t, m: t.update({"A.1.P": 2 * t["A.1.P"]}) or m, "orthonormal"),
    "explained-short": (lambda t, m: t.update({"B.0.explained": t["B.0.explained"][:-1].clone()}) or m,
                        "B.0.explained must be float32 of shape"),
    "n_pc-too-large": (lambda t, m: dict(m, n_pc={"A": [99, 6], "B": [6, 6]}), "n_pc of A.0 must be an int"),
    "fingerprints-list": (lambda t, m: dict(m, fingerprints=["x"]), "fingerprints must map"),
}


@pytest.mark.parametrize("case", sorted(SUBSPACE_EDITS))
def test_edited_subspace_refused_at_load(case, tmp_path):
    """A subspace file that load accepted and that then failed in apply or a forward (IndexError,
    AttributeError, a dtype RuntimeError) or loaded wrong: refused at load, naming the file and the problem."""
    sub_path, _, _ = saved_toy_task(tmp_path)
    with safe_open(sub_path, framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["eigenlorax"])
    edit, message = SUBSPACE_EDITS[case]
    meta = edit(t, meta)
    rewrite(sub_path, t, eigenlorax=meta if isinstance(meta, str) else json.dumps(meta), digest=None)
    with pytest.raises(FormatError, match=rf"{sub_path}: malformed subspace file .*{message}"):
        EigenSubspace.load(sub_path)


@pytest.mark.parametrize("case", ["basis", "base-weight", "alpha-int", "head-complex"])
def test_task_file_cannot_write_the_basis_or_base_weights(case, tmp_path):
    """load_coefficients copied a task's extra tensor into any parameter or buffer of that name: the shared
    basis (PA, zeroing it for every later task) or an adapted layer's frozen weight. Refused, with the
    model unchanged; so are loadings that are not floating-point and a complex head."""
    sub_path, coef, em = saved_toy_task(tmp_path)
    key, value = {"basis": ("extra.enc.q.PA", torch.zeros(40, 8)),
                  "base-weight": ("extra.enc.v.base.weight", torch.zeros(32, 40)),
                  "alpha-int": ("enc.q.alpha_A", torch.ones(8, 3, dtype=torch.int32)),
                  "head-complex": ("extra.head.weight", torch.ones(2, 80, dtype=torch.complex64))}[case]
    rewrite(coef, {key: value}, digest=None)
    before = {k: v.clone() for k, v in em.model.state_dict().items() if isinstance(v, torch.Tensor)}
    PA = em.layers["enc.q"].PA.clone()
    message = "adapted layer" if case in ("basis", "base-weight") else "dtype"
    with pytest.raises(FormatError, match=f"{coef}: .*{message}"):
        em.load_coefficients(coef)
    assert all(torch.equal(v, before[k]) for k, v in em.model.state_dict().items() if k in before)
    assert torch.equal(em.layers["enc.q"].PA, PA)


@pytest.mark.parametrize("case", ["rank-0", "alpha_B-rows", "task-type-unknown", "alpha-bool"])
def test_export_task_refuses_unusable_tasks_naming_the_file(case, tmp_path):
    """export_task wrote r = 0 (a folder peft and our reader refuse), blamed alpha_A's K for a wrong alpha_B,
    and gave messages without the file."""
    sub_path, coef, em = saved_toy_task(tmp_path)
    if case == "rank-0":
        rewrite(coef, {f"{m}.alpha_{s}": torch.zeros(8, 0) for m in TOY_LAYERS for s in "AB"}, digest=None)
        message = "rank r >= 1"
    elif case == "alpha_B-rows":
        rewrite(coef, {"enc.q.alpha_B": torch.zeros(5, 3)}, digest=None)
        message = r"enc.q.alpha_B does not fit the subspace \(5 rows, its basis has K = 8\)"
    elif case == "alpha-bool":
        rewrite(coef, {"enc.v.alpha_A": torch.ones(8, 3, dtype=torch.bool)}, digest=None)
        message = "not floating types"
    else:
        rewrite(coef, task_type="FOO", digest=None)
        message = "records task_type must be one of peft's"
    with pytest.raises(FormatError, match=f"{coef}: .*{message}"):
        eigenlorax.export_task(EigenSubspace.load(sub_path), coef, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("where", ["loading", "head", "subspace"])
def test_non_finite_in_files_refused(where, tmp_path):
    """NaN / Inf in a file (an old one without digest, or written by other code) is refused at load,
    naming the file and the tensor; nothing is exported."""
    sub_path, coef, em = saved_toy_task(tmp_path)
    path, key, value = {"loading": (coef, "enc.v.alpha_B", math.nan),
                        "head": (coef, "extra.head.weight", math.inf),
                        "subspace": (sub_path, "B.1.P", math.nan)}[where]
    t = safe_open(path, framework="pt").get_tensor(key)
    t.view(-1)[0] = value
    rewrite(path, {key: t}, digest=None)
    with pytest.raises(FormatError, match=rf"{path}: tensor {key} holds NaN or Inf"):
        eigenlorax.export_task(EigenSubspace.load(sub_path), coef, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    if path == coef:
        with pytest.raises(FormatError, match=rf"{key} holds NaN"):
            em.load_coefficients(coef)
        t = safe_open(path, framework="pt").get_tensor(key)
        with pytest.raises(FormatError, match=rf"{key} holds NaN"):
            em.load_coefficients({**em.coefficients(), key: t})


def test_non_finite_scaling_and_loadings_refused(tmp_path):
    sub_path, coef, em = saved_toy_task(tmp_path)
    sub = EigenSubspace.load(sub_path)
    out = str(tmp_path / "out")
    for bad in (math.nan, math.inf, 0.0, -1.0):
        with pytest.raises(ValueError, match="scaling must be a finite number > 0"):
            eigenlorax.export_task(sub, coef, out, scaling=bad)
        with pytest.raises(ValueError, match="scaling must be a finite number"):
            eigenlorax.apply(Toy(), sub, 3, scaling=bad)
    assert not os.path.exists(out)
    rewrite(coef, scaling="nan", digest=None)   # a recorded NaN (an older file)
    with pytest.raises(ValueError, match=rf"{coef}: scaling must be a finite number"):
        eigenlorax.export_task(sub, coef, out)
    eigenlorax.export_task(sub, coef, out, scaling=0.5)   # overriding it is fine
    with open(os.path.join(out, io.ADAPTER_CONFIG)) as f:
        assert json.load(f)["lora_alpha"] == pytest.approx(1.5)   # strict JSON, finite
    # a diverged task is neither saved nor exported
    with torch.no_grad():
        em.layers["enc.q"].alpha_A[0, 0] = math.nan
    with pytest.raises(FormatError, match="enc.q.alpha_A holds NaN"):
        em.save_coefficients(str(tmp_path / "diverged.safetensors"))
    with pytest.raises(FormatError, match="lora_A.weight holds NaN"):
        em.export_peft(str(tmp_path / "diverged"))
    assert not os.path.exists(tmp_path / "diverged.safetensors") and not os.path.exists(tmp_path / "diverged")


# ---------------------------------------------------------------------------------------------
# errors


def test_build_errors():
    ads = random_adapters(TOY_LAYERS, 2, 4)
    with pytest.raises(ValueError, match="at least 2"):
        eigenlorax.build_subspace(ads[:1])
    with pytest.raises(ValueError, match="at least 2"):
        eigenlorax.build_subspace([])
    fewer = random_adapters({"enc.q": TOY_LAYERS["enc.q"]}, 1, 4)[0]
    with pytest.raises(ValueError, match=r"different layers.*enc\.v"):
        eigenlorax.build_subspace([ads[0], fewer])
    wrong = random_adapters({"enc.q": (48, 41), "enc.v": (32, 40)}, 1, 4)[0]
    with pytest.raises(ValueError, match=r"enc\.q.*shape"):
        eigenlorax.build_subspace([ads[0], wrong])
    with pytest.raises(ValueError, match="components or variance"):
        eigenlorax.build_subspace(ads, components=4, variance=0.9)
    for v in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="variance"):
            eigenlorax.build_subspace(ads, variance=v)
    with pytest.raises(ValueError, match="components"):
        eigenlorax.build_subspace(ads, components=0)
    with pytest.raises(ValueError, match="augment"):
        eigenlorax.build_subspace(ads, augment=-1)
    dora = random_adapters(TOY_LAYERS, 1, 4)[0]
    dora.config["use_dora"] = True
    with pytest.raises(FormatError, match=r"adapter\[1\]: DoRA"):
        eigenlorax.build_subspace([ads[0], dora])
    with pytest.raises(ValueError, match="different base models"):
        eigenlorax.build_subspace([ads[0], random_adapters(TOY_LAYERS, 1, 4, base_name="other")[0]])


def test_build_compares_base_folders_by_real_path(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "x").mkdir()
    names = [str(tmp_path / "base"), str(tmp_path / "base") + "/", str(tmp_path / "x" / ".." / "base")]
    ads = [random_adapters(TOY_LAYERS, 1, 4, base_name=n)[0] for n in names]
    sub = eigenlorax.build_subspace(ads, components=2)
    assert sub.meta["base_model_name_or_path"] == names[0]   # as the first adapter wrote it


@pytest.mark.parametrize("side,value", [("lora_A", math.nan), ("lora_B", math.inf)])
def test_build_names_non_finite_adapter_and_layer(side, value, tmp_path):
    ads = random_adapters(TOY_LAYERS, 3, 4)
    key = f"{PEFT_PREFIX}enc.v.{side}.weight"
    ads[2].tensors[key][1, 2] = value
    dirs = [str(tmp_path / f"ad{i}") for i in range(3)]
    for d, ad in zip(dirs, ads):
        ad.save_adapter(d)
    with pytest.raises(ValueError, match=rf"{dirs[2]}: layer enc\.v: {side} holds NaN or Inf"):
        eigenlorax.build_subspace(dirs)
    with pytest.raises(ValueError, match=rf"adapter\[2\]: layer enc\.v: {side}"):
        eigenlorax.build_subspace(ads)
    ads[2].tensors[key][1, 2] = 0.0
    ads[2].config["lora_alpha"] = math.nan
    with pytest.raises(ValueError, match=r"adapter\[2\]: layer enc\.q: scaling"):
        eigenlorax.build_subspace(ads)


def test_build_refuses_the_same_adapter_twice(tmp_path):
    ads = random_adapters(TOY_LAYERS, 2, 4)
    d0, d1 = str(tmp_path / "ad0"), str(tmp_path / "ad1")
    ads[0].save_adapter(d0)
    ads[1].save_adapter(d1)
    os.symlink(d0, tmp_path / "link")
    shutil.copytree(d0, tmp_path / "copy")
    for second in (d0, d0 + "/", str(tmp_path / "link"), str(tmp_path / ".." / tmp_path.name / "ad0")):
        with pytest.raises(ValueError, match=r"same adapter \(same folder\)"):
            eigenlorax.build_subspace([d0, d1, second])
    with pytest.raises(ValueError, match=r"copy and .*ad0 are the same adapter \(same weights and scalings\)"):
        eigenlorax.build_subspace([d0, d1, str(tmp_path / "copy")])
    with pytest.raises(ValueError, match=r"adapter\[1\] and adapter\[0\] are the same adapter"):
        eigenlorax.build_subspace([ads[0], ads[0]])
    # the same factors under another lora_alpha: another update (twice the first), not a duplicate
    config = json.loads((tmp_path / "copy" / "adapter_config.json").read_text())
    config["lora_alpha"] = 2 * config.get("lora_alpha", 8)
    (tmp_path / "copy" / "adapter_config.json").write_text(json.dumps(config))
    assert eigenlorax.build_subspace([d0, d1, str(tmp_path / "copy")], components=2).modules


def test_build_names_a_shape_difference_between_adapters(tmp_path):
    """An adapter of another base (other widths, fewer layers) was said to adapt different layers only."""
    ads = random_adapters(TOY_LAYERS, 2, 4)
    g = torch.Generator().manual_seed(5)
    small = PeftAdapter(dict(ads[0].config), {
        "base_model.model.enc.q.lora_A.weight": torch.randn(4, 20, generator=g),
        "base_model.model.enc.q.lora_B.weight": torch.randn(24, 4, generator=g)})
    with pytest.raises(ValueError, match=r"missing \['enc.v'\].*enc.q is 24 x 20 there, 48 x 40 in .*another base"):
        eigenlorax.build_subspace([ads[0], ads[1], small])


def test_apply_errors():
    sub = toy_subspace()
    with pytest.raises(ValueError, match=r"layer enc\.q: no module enc\.q in the model"):
        eigenlorax.apply(Toy(q_name="k"), sub, 4)            # the model has no enc.q
    with pytest.raises(ValueError, match=r"enc\.q"):
        eigenlorax.apply(Toy(q_in=41), sub, 4)               # enc.q has another shape
    with pytest.raises(ValueError, match="init"):
        eigenlorax.apply(Toy(), sub, 4, init="zeros")
    with pytest.raises(ValueError, match="task_rank"):
        eigenlorax.apply(Toy(), sub, 0)


def test_base_fingerprint_mismatch(tmp_path):
    model = Toy()
    base = str(tmp_path / "toy.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, base)
    sub = eigenlorax.build_subspace(random_adapters(TOY_LAYERS, 3, 4), components=4, base=base)
    assert set(sub.meta["fingerprints"]) == set(TOY_LAYERS)
    eigenlorax.apply(copy.deepcopy(model), sub, 4)       # the same base: fine
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.enc.v.weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match=r"enc\.v.*fingerprint"):
        eigenlorax.apply(copy.deepcopy(other), sub, 4)
    # the fingerprints survive save/load
    path = str(tmp_path / "sub.safetensors")
    sub.save(path)
    with pytest.raises(ValueError, match=r"enc\.v.*fingerprint"):
        eigenlorax.apply(copy.deepcopy(other), EigenSubspace.load(path), 4)
    eigenlorax.apply(copy.deepcopy(other), sub, 4, check_base=False)   # the caller vouches for it
    wide = Toy(q_in=41)
    wbase = str(tmp_path / "wide.safetensors")
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, wbase)
    with pytest.raises(ValueError, match=r"enc\.q: the base's enc\.q\.weight is \(48, 41\) but the adapters' update "
                                         r"is 48 out x 40 in.*base model"):
        eigenlorax.build_subspace(random_adapters(TOY_LAYERS, 3, 4), components=4, base=wbase)


@pytest.mark.parametrize("case", ["fingerprint", "shape"])
def test_failed_apply_leaves_model_untouched(case, tmp_path):
    """apply() that fails on a later layer (enc.v) must not leave earlier layers (enc.q) wrapped or
    the model's parameters frozen: the model must be usable as it was."""
    model = Toy()
    if case == "fingerprint":
        base = str(tmp_path / "toy.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, base)
        sub = eigenlorax.build_subspace(random_adapters(TOY_LAYERS, 3, 4), components=4, base=base)
        with torch.no_grad():
            model.enc.v.weight[0, 0] += 1e-3
    else:
        sub = eigenlorax.build_subspace(random_adapters(TOY_LAYERS, 3, 4), components=4)
        model.enc.v = torch.nn.Linear(41, 32)
    with pytest.raises(ValueError, match=r"enc\.v"):
        eigenlorax.apply(model, sub, 4)
    assert type(model.enc.q) is torch.nn.Linear, f"enc.q left wrapped: {type(model.enc.q).__name__}"
    assert all(p.requires_grad for p in model.parameters()), "parameters left frozen"


def test_load_rejects_non_subspace_files(tmp_path):
    ad = random_adapters(TOY_LAYERS, 1, 4)[0]
    ad.save_adapter(str(tmp_path / "ad"))
    with pytest.raises(FormatError, match="not an EigenLoRAx subspace"):
        EigenSubspace.load(str(tmp_path / "ad" / io.ADAPTER_WEIGHTS))
    junk = tmp_path / "junk.safetensors"
    junk.write_text("hello")
    with pytest.raises(FormatError):
        EigenSubspace.load(str(junk))
    with pytest.raises(FormatError):
        EigenSubspace.load(str(tmp_path / "missing.safetensors"))


# ---------------------------------------------------------------------------------------------
# real training


@pytest.fixture(scope="session")
def real_adapters(tmp_path_factory):
    """Two tiny real LoRA r=8 adapters (query/value + head) on other word tasks, 20 steps each."""
    root = tmp_path_factory.mktemp("eigen_real")
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny batches: 1 thread is fastest, and far faster on a busy machine
    try:
        for name in ("blob-polarity", "pos-noun-verb"):
            folder = str(root / name)
            train.train_lora_adapter(data.word_task(name, limit=800), folder, steps=20, lr=5e-3, batch_size=16,
                                     seed=0)
            out.append(folder)
    finally:
        torch.set_num_threads(threads)
    return out


def test_training_loadings_reduces_loss(real_adapters):
    sub = eigenlorax.build_subspace(real_adapters, components=16, base=str(models.minilm_dir()))
    assert {sub.size(m) for m in sub.modules} == {15} and len(sub.modules) == 12   # capped at N·r − 1
    model, tok = train.load_classifier(seed=0)
    em = eigenlorax.apply(model, sub, 8, init="lora", trainable=("classifier",))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    task = data.word_task("vader-polarity", limit=800)
    enc, y = train.encode(tok, task.train[:128])

    def loss():
        return float(torch.nn.functional.cross_entropy(logits(model, enc), y))

    torch.set_num_threads(1)   # restored by conftest
    before = loss()
    log = train.train(model, tok, task, steps=30, lr=5e-3, batch_size=16, seed=0)
    after = loss()
    assert after < before - 0.05, (before, after)
    assert sum(log.loss[-10:]) / 10 < sum(log.loss[:5]) / 5
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} changed"
    assert all(float(l.alpha_B.abs().max()) > 0 for l in em.layers.values())


def test_transformers_trainer_trains_only_the_loadings(real_adapters, tmp_path):
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    sub = eigenlorax.build_subspace(real_adapters, components=8)
    model, tok = train.load_classifier(seed=0)
    em = eigenlorax.apply(model, sub, 4, init="uniform", trainable=("classifier",))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == em.trainable_parameters()
    task = data.word_task("vader-polarity", limit=400)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             logging_steps=3, seed=0, disable_tqdm=True)
    out = Trainer(model=model, args=args, train_dataset=train.TokenizedTask(tok, task.train, max_length=16),
                  data_collator=DataCollatorWithPadding(tok)).train()
    assert math.isfinite(out.training_loss)
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in trainable), f"{n}: changed={changed}, trainable={n in trainable}"


# ---------------------------------------------------------------------------------------------
# CLI


def run_cli(argv, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:   # argparse usage errors
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


class _Terminal(io_module.StringIO):
    """A stderr that says it is a terminal (progress bars draw only on one)."""
    def isatty(self):
        return True


def _screen(raw: str) -> List[str]:
    """The lines a terminal shows for ``raw``: a carriage return moves back to the line's start, later text
    overwrites (tqdm's bars redraw so, and a closed bar that does not stay blanks its line)."""
    rows = []
    for line in raw.split("\n"):
        row, pos = [], 0
        for ch in line:
            if ch == "\r":
                pos = 0
                continue
            row[pos:pos + 1] = [ch]
            pos += 1
        rows.append("".join(row).rstrip())
    return [r for r in rows if r]


def test_cli_progress_bars_draw_on_a_terminal_only_and_an_error_inside_one_is_a_clean_line(tmp_path, monkeypatch):
    """A command that failed while it held a progress bar printed its error after the bar's text, on the bar's line;
    now the CLI closes open bars first. An error inside a bar's loop (here the third adapter read holds a NaN)
    leaves the one-line error alone on the terminal. A stderr that is no terminal (a log, a pipe) gets no bar
    frames at all, only the messages."""
    dirs = []
    for i, ad in enumerate(random_adapters(TOY_LAYERS, 3, 4)):
        ad.tensors[f"{PEFT_PREFIX}enc.q.lora_B.weight"][0, 0] = math.nan if i == 2 else 0.5
        dirs.append(str(tmp_path / f"ad{i}"))
        ad.save_adapter(dirs[-1])
    out = str(tmp_path / "sub.safetensors")
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert cli.main(["eigen", "build", *dirs, "-o", out]) == 1
    raw = sys.stderr.getvalue()
    assert "eigen: adapters" in raw   # the bar drew
    assert _screen(raw) == [f"subspace-ext: error: {dirs[2]}: layer enc.q: lora_B holds NaN or Inf"], raw

    def failing(*args, **kwargs):   # a command that fails while it holds a bar (the demo's stages bar is held so)
        bar = io.progress_bar(None, "stages", True, unit="stage", total=3, leave=True)
        bar.update(1)
        raise ValueError("boom")
    from tqdm import tqdm
    own = tqdm(total=2, file=io_module.StringIO())   # a caller's bar: left alone
    monkeypatch.setattr(sys, "stderr", _Terminal())
    monkeypatch.setattr(eigenlorax, "build_subspace", failing)
    assert cli.main(["eigen", "build", *dirs, "-o", out]) == 1
    assert own in tqdm._instances
    own.close()
    screen = _screen(sys.stderr.getvalue())   # the bar that stays ends its line; the error has its own
    assert len(screen) == 2 and screen[0].startswith("stages:") and screen[1] == "subspace-ext: error: boom", screen
    monkeypatch.undo()
    log = io_module.StringIO()
    monkeypatch.setattr(sys, "stderr", log)   # no terminal
    assert cli.main(["eigen", "build", *dirs[:2], "-o", out, "--components", "2"]) == 0
    assert "\r" not in log.getvalue() and "eigen:" not in log.getvalue(), log.getvalue()


def test_cli_warnings_are_one_line_each(tmp_path):
    """The console script prints a warning as the errors are printed, without the library's file, line and code."""
    dirs = []
    for i, ad in enumerate(random_adapters(TOY_LAYERS, 2, 4)):
        dirs.append(str(tmp_path / f"ad{i}"))
        ad.save_adapter(dirs[-1])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    r = subprocess.run([sys.executable, "-m", "subspace_ext.cli", "eigen", "build", *dirs, "-o",
                        str(tmp_path / "s.safetensors"), "-q"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines and all(line.startswith("subspace-ext: warning: EigenLoRAx: ") for line in lines), r.stderr


def test_cli_prints_other_libraries_warnings_as_python_does(monkeypatch, tmp_path):
    """Only our warnings (SubspaceExtWarning) take the one-line "subspace-ext: warning:" form; another library's
    warning kept that prefix too, as if subspace_ext had said it, and lost the file that names its source, also
    where it points at our file (torch's C++ warnings point at the Python frame that called torch)."""
    printed = []

    def command(args):
        printed.append(warnings.formatwarning("ours", subspace_ext.SubspaceExtWarning, eigenlorax.__file__, 7, "l"))
        for name in (eigenlorax.__file__, "/x/site-packages/transformers/modeling_utils.py"):
            printed.append(warnings.formatwarning("theirs", UserWarning, name, 7, "the line"))
        return 0

    monkeypatch.setattr(cli, "_run", command)
    assert cli.main(["eigen", "inspect", str(tmp_path)]) == 0
    assert printed[0] == "subspace-ext: warning: ours\n"
    assert printed[1].startswith(f"{eigenlorax.__file__}:7: UserWarning: theirs")
    assert printed[2].startswith("/x/site-packages/transformers/modeling_utils.py:7: UserWarning: theirs")
    assert warnings.formatwarning("after", UserWarning, cli.__file__, 1, "x").startswith(cli.__file__)  # put back


def test_cli_build_and_export(tmp_path, capsys):
    dirs = []
    for i, ad in enumerate(random_adapters(TOY_LAYERS, 3, 4)):
        dirs.append(str(tmp_path / f"ad{i}"))
        ad.save_adapter(dirs[-1])
    sub_path = str(tmp_path / "sub.safetensors")
    rc, out, err = run_cli(["eigen", "build", *dirs, "-o", sub_path, "--components", "5", "--augment", "2",
                            "--seed", "3"], capsys)
    assert rc == 0, err
    assert os.path.isfile(sub_path) and sub_path in out
    assert "K per layer 7 (lora_A) / 7 (lora_B) (principal + 2 augmentation)" in out
    # more augmentation than there are directions left: capped per layer and side (d - 5), and said so
    rc, big, err = run_cli(["eigen", "build", *dirs, "-o", str(tmp_path / "big.safetensors"), "--components", "5",
                            "--augment", "1000"], capsys)
    assert rc == 0 and "(principal + 27..43 augmentation)" in big, big + err
    sub = EigenSubspace.load(sub_path)
    assert {sub.size(m) for m in sub.modules} == {7} and sub.A["enc.q"].n_pc == 5
    assert torch.equal(sub.A["enc.q"].P, eigenlorax.build_subspace(dirs, components=5, augment=2, seed=3).A["enc.q"].P)
    em = eigenlorax.apply(Toy(), sub, 4)
    coef = str(tmp_path / "task.safetensors")
    em.save_coefficients(coef)
    out_dir = str(tmp_path / "exported")
    rc, out, err = run_cli(["eigen", "export", sub_path, "--coefficients", coef, "-o", out_dir,
                            "--scaling", "0.5"], capsys)
    assert rc == 0, err
    ad = PeftAdapter.load(out_dir)
    assert {u.module for u in ad.updates()} == set(TOY_LAYERS)
    assert all(u.scaling == pytest.approx(0.5) for u in ad.updates())
    # variance selection through the CLI; inspect shows what each layer and side kept
    rc, _, err = run_cli(["eigen", "build", *dirs, "-o", sub_path, "--variance", "0.5"], capsys)
    assert rc == 0, err
    rc, out, err = run_cli(["eigen", "inspect", sub_path], capsys)
    assert rc == 0, err
    sub = EigenSubspace.load(sub_path)
    assert "subspace of 3 adapters, 2 layers (variance 0.5, augment 0, seed 0)" in out
    for m in sub.modules:
        a, b = sub.A[m], sub.B[m]
        kept = [float(x.explained.double().sum()) for x in (a, b)]
        assert min(kept) >= 0.5
        assert (f"{m} | {a.P.shape[1]} ({a.n_pc} + 0), {kept[0]:.4f} | {b.P.shape[1]} ({b.n_pc} + 0), "
                f"{kept[1]:.4f}") in out
    rc, _, err = run_cli(["eigen", "inspect", coef], capsys)   # a task file, not a subspace
    assert rc == 1 and "not an EigenLoRAx subspace" in err


@pytest.mark.parametrize("case", ["one-adapter", "missing-folder", "variance-range", "both", "not-subspace",
                                  "bad-output", "same-adapter", "nan-adapter", "corrupt-subspace", "nan-scaling",
                                  "zero-scaling", "output-under-a-file"])
def test_cli_user_errors(case, tmp_path, capsys):
    dirs = []
    for i, ad in enumerate(random_adapters(TOY_LAYERS, 2, 4)):
        dirs.append(str(tmp_path / f"ad{i}"))
        ad.save_adapter(dirs[-1])
    out = str(tmp_path / "sub.safetensors")
    if case == "nan-adapter":
        bad = random_adapters(TOY_LAYERS, 1, 4)[0]
        bad.tensors[f"{PEFT_PREFIX}enc.q.lora_B.weight"][0, 0] = math.nan
        dirs.append(str(tmp_path / "ad_nan"))
        bad.save_adapter(dirs[-1])
    if case == "bad-output":   # an existing file of another kind is not replaced
        shutil.copy(os.path.join(dirs[0], io.ADAPTER_WEIGHTS), str(tmp_path / "model.safetensors"))
    sub_file, coef = str(tmp_path / "given.safetensors"), str(tmp_path / "task.safetensors")
    if case in ("corrupt-subspace", "nan-scaling", "output-under-a-file"):
        sub = eigenlorax.build_subspace(dirs, components=3)
        sub.save(sub_file)
        eigenlorax.apply(Toy(), sub, 2).save_coefficients(coef)
        if case == "corrupt-subspace":
            with open(sub_file, "r+b") as f:
                f.seek(-4, os.SEEK_END)
                f.write(struct.pack("<f", 0.123456))
    export = ["eigen", "export", sub_file, "--coefficients", coef, "-o", str(tmp_path / "x")]
    argv = {
        "one-adapter": ["eigen", "build", dirs[0], "-o", out],
        "missing-folder": ["eigen", "build", dirs[0], str(tmp_path / "nope"), "-o", out],
        "variance-range": ["eigen", "build", *dirs, "-o", out, "--variance", "1.5"],
        "both": ["eigen", "build", *dirs, "-o", out, "--variance", "0.5", "--components", "3"],
        "not-subspace": ["eigen", "export", os.path.join(dirs[0], io.ADAPTER_WEIGHTS), "--coefficients",
                         os.path.join(dirs[1], io.ADAPTER_WEIGHTS), "-o", str(tmp_path / "x")],
        "bad-output": ["eigen", "build", *dirs, "-o", str(tmp_path / "model.safetensors")],
        "same-adapter": ["eigen", "build", dirs[0], dirs[1], dirs[0], "-o", out],
        "nan-adapter": ["eigen", "build", *dirs, "-o", out],
        "corrupt-subspace": export,
        "nan-scaling": export + ["--scaling", "nan"],
        "zero-scaling": export + ["--scaling", "0"],
        "output-under-a-file": export[:-1] + [os.path.join(coef, "x")],   # refused before the export's work
    }[case]
    rc, _, err = run_cli(argv, capsys)
    assert rc not in (0, None), err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], err
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "x")
    named = {"same-adapter": "same adapter", "nan-adapter": f"{dirs[-1]}: layer enc.q: lora_B holds NaN",
             "corrupt-subspace": f"{sub_file}: corrupt file", "nan-scaling": "argument --scaling: expected a number in (0, ∞), got 'nan'",
             "zero-scaling": "argument --scaling: expected a number in (0, ∞), got '0'",
             "output-under-a-file": f"--output {coef}/x: {coef} is not a folder",
             "bad-output": "exists and is not an EigenLoRAx subspace"}
    if case == "bad-output":
        with open(os.path.join(dirs[0], io.ADAPTER_WEIGHTS), "rb") as a, open(argv[-1], "rb") as b:
            assert a.read() == b.read()
    assert named.get(case, "") in lines[0], lines[0]


def test_build_names_a_layer_pruned_to_rank_0_in_every_adapter():
    """AdaLoRA may prune a layer to rank 0: in some adapters the stack still has columns; in all of
    them the error named no layer (rsvd's 'rank must be in [1, 0]')."""
    def adalora(v_rank, seed):
        g = torch.Generator().manual_seed(seed)
        t = {}
        for mod, (m, n) in TOY_LAYERS.items():
            r = v_rank if mod == "enc.v" else 4
            t[f"{PEFT_PREFIX}{mod}.lora_A.weight"] = torch.randn(r, n, generator=g)
            t[f"{PEFT_PREFIX}{mod}.lora_B.weight"] = torch.randn(m, r, generator=g)
            t[f"{PEFT_PREFIX}{mod}.lora_E.weight"] = torch.randn(r, 1, generator=g)
        return PeftAdapter({"peft_type": "ADALORA", "init_r": 4, "lora_alpha": 8, "target_modules": sorted(TOY_LAYERS),
                            "base_model_name_or_path": "synthetic-base"}, t)
    sub = eigenlorax.build_subspace([adalora(0, 1), adalora(3, 2)], components=2)  # pruned in one: fine
    assert set(sub.A) == set(TOY_LAYERS)
    with pytest.raises(ValueError, match=r"layer enc\.v: every adapter has rank 0 there"):
        eigenlorax.build_subspace([adalora(0, 1), adalora(0, 2)], components=2)
