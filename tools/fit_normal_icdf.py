"""Fit the coefficient table of philox_normal's "icdf" transform and write its C++ header.

    python tools/fit_normal_icdf.py            # writes csrc/include/subspace_ext/normal_icdf_table.h
    python tools/fit_normal_icdf.py --check    # only report the accuracy of the committed table

The transform (csrc/include/subspace_ext/philox.h, `icdf_normal`) maps one 32-bit Philox word w to
one float32 standard normal number:

    a = (w << 1) | 1                 odd, p = a / 2^33 in (0, 1/2) is the centre of w's cell
    e = clz(a)                       octave: a in [2^(31-e), 2^(32-e))
    n = a << e                       normalised: bit 31 set
    seg = 4 e + bits 30..29 of n     128 segments, 4 per octave
    m = bits 28..6 of ~n             23 bits: the distance to the segment's upper end
    v = float(0x3F800000 | m) - 1    exactly, in [0, 1)
    |z| = c0 + v (c1 + v (c2 + ... v c5))   each step one fused multiply-add (rounded once)
    z = |z| with w's top bit as its sign

Bits of a below n's bit 6 are dropped only in octaves 0..5 (e < 6); there one (seg, m) stands for
2^(5-e) neighbouring words, and the target is the quantile of the middle of their cells. This
script is the definition of the table: the header is generated once and committed; tests compare
the op's output with float64 `ndtri` of each word's cell (tests/reference.py).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "csrc" / "include" / "subspace_ext" / "normal_icdf_table.h"
DEG, SEGS, STRIDE = 5, 128, 8  # 6 coefficients per segment, padded to 8 floats (two 16-byte loads)


def cell_quantile(a: np.ndarray) -> np.ndarray:
    """|z| of the cell of odd a (uint64 array): -ndtri(mid / 2^33), mid = the middle of the cells
    of the words that share a's (seg, m)."""
    e = 31 - np.floor(np.log2(a.astype(np.float64))).astype(np.int64)
    d = np.maximum(6 - e, 0)
    base = (a >> d.astype(np.uint64)) << d.astype(np.uint64)
    mid = np.where(d == 0, a, base + (np.uint64(1) << np.maximum(d - 1, 0).astype(np.uint64)))
    p = torch.from_numpy(mid.astype(np.float64) / 2.0**33)
    return (-torch.special.ndtri(p)).numpy()


def seg_and_v(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The integer steps of the transform on odd a (uint64 < 2^32): segment index and v (float32)."""
    e = 31 - np.floor(np.log2(a.astype(np.float64))).astype(np.int64)
    n = (a << e.astype(np.uint64)) & np.uint64(0xFFFFFFFF)
    seg = 4 * e + ((n >> np.uint64(29)) & np.uint64(3)).astype(np.int64)
    m = ((~n) >> np.uint64(6)) & np.uint64(0x7FFFFF)
    v = ((np.uint64(0x3F800000) | m).astype(np.uint32).view(np.float32) - np.float32(1)).astype(np.float32)
    return seg, v


def fma32(a, b, c) -> np.ndarray:
    """float32 a * b + c rounded once (IEEE fma), for float32 arrays with normal results.

    The product is exact in float64. Rounding the float64 sum s to float32 is then correct except
    where s lies exactly halfway between two floats and the float64 addition had lost a nonzero
    remainder e (s + e = a b + c exactly, by TwoSum): there e's sign picks the neighbour."""
    p = np.asarray(a, np.float32).astype(np.float64) * np.asarray(b, np.float32).astype(np.float64)
    cd = np.asarray(c, np.float32).astype(np.float64)
    s = p + cd
    bv = s - p
    e = (p - (s - bv)) + (cd - bv)
    r = s.astype(np.float32)
    bits = s.view(np.uint64)
    half = (bits & np.uint64((1 << 29) - 1)) == np.uint64(1 << 28)  # float32 midpoint
    t = (bits & ~np.uint64((1 << 29) - 1)).view(np.float64).astype(np.float32)  # toward zero
    away = np.nextafter(t, np.copysign(np.float32(np.inf), t))
    fixed = np.where((e > 0) == (s > 0), away, t)
    return np.where(half & (e != 0), fixed, r).astype(np.float32)


def horner32(c: np.ndarray, v: np.ndarray) -> np.ndarray:
    acc = np.full_like(v, c[DEG])
    for k in range(DEG - 1, -1, -1):
        acc = fma32(acc, v, np.full_like(v, c[k]))
    return acc


def segment_words(s: int, samples: int, rng) -> np.ndarray:
    """Odd a values of segment s: all of them where few, else the two ends and a random sample."""
    e, j = divmod(s, 4)
    lo = -(-(2**31 + j * 2**29) >> e)  # a << e in [2^31 + j 2^29, 2^31 + (j+1) 2^29): ceilings
    hi = -(-(2**31 + (j + 1) * 2**29) >> e)  # exclusive
    lo |= 1
    if hi <= lo:
        return np.zeros(0, np.uint64)
    count = (hi - lo + 1) // 2
    if count <= samples:
        return np.arange(lo, hi, 2, dtype=np.uint64)
    pick = rng.integers(0, count, samples, dtype=np.int64)
    return np.unique(np.r_[lo, hi - 1 if (hi - 1) & 1 else hi - 2, lo + 2 * pick].astype(np.uint64))


def fit_table(samples: int = 1 << 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    table = np.zeros((SEGS, STRIDE), np.float32)
    for s in range(SEGS):
        a = segment_words(s, samples, rng)
        if a.size == 0:
            continue
        _, v = seg_and_v(a)
        y = cell_quantile(a)
        vu, idx = np.unique(v.astype(np.float64), return_index=True)
        V = np.vander(vu, min(DEG + 1, vu.size), increasing=True)
        w = 1.0 / y[idx]  # relative least squares
        c, *_ = np.linalg.lstsq(V * w[:, None], y[idx] * w, rcond=None)
        table[s, : c.size] = c.astype(np.float32)
    return table


def ulp_errors(table: np.ndarray, samples: int, seed: int = 1) -> tuple[np.ndarray, float]:
    """Per-segment worst error in float32 ulps of the exact value, and the smallest |z| produced."""
    rng = np.random.default_rng(seed)
    worst, smallest = np.zeros(SEGS), np.inf
    for s in range(SEGS):
        a = segment_words(s, samples, rng)
        if a.size == 0:
            continue
        seg, v = seg_and_v(a)
        assert (seg == s).all()
        z = horner32(table[s], v).astype(np.float64)
        exact = cell_quantile(a)
        ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
        worst[s] = (np.abs(z - exact) / ulp).max()
        smallest = min(smallest, z.min())
    return worst, smallest


def write_header(table: np.ndarray) -> None:
    rows = []
    for s in range(SEGS):
        vals = ", ".join(float(x).hex() + "f" if x != 0 else "0.0f" for x in table[s])
        rows.append(f"    {vals}" + (", \\" if s < SEGS - 1 else ""))
    HEADER.write_text(
        "// Generated by tools/fit_normal_icdf.py (the definition of philox_normal's \"icdf\" transform);\n"
        "// do not edit. 128 segments (4 per octave of the cell's quantile p), each 6 float32\n"
        "// coefficients c0..c5 of |z| = c0 + v (c1 + ... v c5) (FMA steps), padded to 8 floats.\n"
        "#pragma once\n\n"
        f"#define SUBSPACE_EXT_NORMAL_ICDF_SEGMENTS {SEGS}\n"
        f"#define SUBSPACE_EXT_NORMAL_ICDF_STRIDE {STRIDE}\n"
        "#define SUBSPACE_EXT_NORMAL_ICDF_COEFFS \\\n" + "\n".join(rows) + "\n\n// end of table\n")


def read_header() -> np.ndarray:
    vals = re.findall(r"(-?0x[0-9a-f.p+-]+|0\.0)f", HEADER.read_text().split("COEFFS", 1)[1])
    return np.array([float.fromhex(x) if x.startswith(("0x", "-0x")) else 0.0 for x in vals],
                    np.float32).reshape(SEGS, STRIDE)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="report the committed table's accuracy only")
    ap.add_argument("--samples", type=int, default=1 << 18, help="words checked per segment (default 2^18)")
    args = ap.parse_args(argv)
    table = read_header() if args.check else fit_table()
    worst, smallest = ulp_errors(table, args.samples)
    print(f"worst error {worst.max():.2f} ulp (segment {worst.argmax()}); segments over 2 ulp: "
          f"{int((worst > 2).sum())}; smallest |z| {smallest:.3g}")
    if smallest < 0:
        sys.exit("fit_normal_icdf: a segment's polynomial goes negative")
    if not args.check:
        write_header(table)
        print(f"wrote {HEADER.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
