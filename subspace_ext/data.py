"""Labelled text tasks: word-level tasks from lexicons that ship inside PyPI packages (no download),
and SST-2 read from a path.

Word-level tasks (binary, balanced by subsampling the larger class, fixed seeded split):
  vader-polarity     VADER lexicon words, mean valence >= 1 (positive) vs <= -1 (negative)
  vader-intensity    VADER words with |valence| >= 2 (strong) vs 0.5 <= |valence| <= 1.2 (mild)
  blob-polarity      TextBlob adjectives, polarity >= 0.2 vs <= -0.2
  blob-subjectivity  TextBlob adjectives, subjectivity >= 0.7 vs <= 0.3
  pos-noun-verb      Brill lexicon (TextBlob) words tagged only NN vs only VB
  pos-adj-adv        Brill lexicon words tagged only JJ vs only RB
"""
from __future__ import annotations

import csv
import importlib.util
import os
import random
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

Example = Tuple[str, int]


@dataclass
class Task:
    name: str
    train: List[Example]
    dev: List[Example]
    labels: Tuple[str, str]


def _package_file(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the data of this task ships in the PyPI package {package!r}: pip install {package}")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing from the installed package {package!r}")
    return path


def _vader() -> Dict[str, float]:
    out = {}
    with open(_package_file("vaderSentiment", "vader_lexicon.txt"), encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 2 and parts[0].isalpha():
                out[parts[0].lower()] = float(parts[1])
    return out


def _blob_adjectives() -> Dict[str, Tuple[float, float]]:
    """word -> (mean polarity, mean subjectivity) over its senses."""
    root = ET.parse(_package_file("textblob", "en", "en-sentiment.xml")).getroot()
    acc: Dict[str, List[Tuple[float, float]]] = {}
    for w in root.iter("word"):
        form = (w.get("form") or "").lower()
        if form.isalpha():
            acc.setdefault(form, []).append((float(w.get("polarity", 0)), float(w.get("subjectivity", 0))))
    return {k: (sum(p for p, _ in v) / len(v), sum(s for _, s in v) / len(v)) for k, v in acc.items()}


def _brill() -> Dict[str, List[str]]:
    out = {}
    with open(_package_file("textblob", "en", "en-lexicon.txt"), encoding="utf-8") as f:
        for line in f:
            if line.startswith(";") or not line.strip():
                continue
            word, *tags = line.split()
            if word.isalpha() and word.islower():
                out[word] = tags
    return out


def _binary(pos: List[str], neg: List[str], seed: int) -> List[Example]:
    rng = random.Random(seed)
    pos, neg = sorted(set(pos)), sorted(set(neg))
    n = min(len(pos), len(neg))
    rng.shuffle(pos)
    rng.shuffle(neg)
    data = [(w, 1) for w in pos[:n]] + [(w, 0) for w in neg[:n]]
    rng.shuffle(data)
    return data


def _vader_polarity(seed):
    v = _vader()
    return _binary([w for w, s in v.items() if s >= 1], [w for w, s in v.items() if s <= -1], seed), ("negative", "positive")


def _vader_intensity(seed):
    v = _vader()
    return (_binary([w for w, s in v.items() if abs(s) >= 2], [w for w, s in v.items() if 0.5 <= abs(s) <= 1.2], seed),
            ("mild", "strong"))


def _blob_polarity(seed):
    b = _blob_adjectives()
    return _binary([w for w, (p, _) in b.items() if p >= 0.2], [w for w, (p, _) in b.items() if p <= -0.2], seed), ("negative", "positive")


def _blob_subjectivity(seed):
    b = _blob_adjectives()
    return (_binary([w for w, (_, s) in b.items() if s >= 0.7], [w for w, (_, s) in b.items() if s <= 0.3], seed),
            ("objective", "subjective"))


def _pos(tag_a: str, tag_b: str):
    def build(seed):
        lex = _brill()
        return (_binary([w for w, t in lex.items() if t == [tag_a]], [w for w, t in lex.items() if t == [tag_b]], seed),
                (tag_b, tag_a))
    return build


WORD_TASKS: Dict[str, Callable[[int], Tuple[List[Example], Tuple[str, str]]]] = {
    "vader-polarity": _vader_polarity,
    "vader-intensity": _vader_intensity,
    "blob-polarity": _blob_polarity,
    "blob-subjectivity": _blob_subjectivity,
    "pos-noun-verb": _pos("NN", "VB"),
    "pos-adj-adv": _pos("JJ", "RB"),
}


def word_task(name: str, *, dev_fraction: float = 0.2, limit: Optional[int] = None, seed: int = 0) -> Task:
    """A word-level task by name (see WORD_TASKS); ``limit`` caps the number of examples."""
    if name not in WORD_TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(WORD_TASKS)}")
    data, labels = WORD_TASKS[name](seed)
    if limit is not None:
        data = data[:limit]
    n_dev = max(1, int(len(data) * dev_fraction))
    return Task(name, data[n_dev:], data[:n_dev], labels)


def default_sst2_path() -> Optional[str]:
    """../shared/data/sst2 next to the repository checkout, when it exists."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(os.path.dirname(here), "shared", "data", "sst2")
    return path if os.path.isdir(path) else None


def sst2(path: Optional[str] = None, *, train_limit: Optional[int] = None, seed: int = 0) -> Task:
    """GLUE SST-2 from a folder with train.tsv and dev.tsv (columns sentence, label; header row)."""
    path = path or default_sst2_path()
    if not path or not os.path.isdir(path):
        raise FileNotFoundError("SST-2 not found: pass the folder holding train.tsv and dev.tsv")

    def read(name):
        fn = os.path.join(path, name)
        if not os.path.isfile(fn):
            raise FileNotFoundError(f"{fn}: missing")
        with open(fn, encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        if not rows or rows[0][:2] != ["sentence", "label"]:
            raise ValueError(f"{fn}: expected a header 'sentence<TAB>label'")
        return [(r[0].strip(), int(r[1])) for r in rows[1:] if len(r) >= 2]

    train = read("train.tsv")
    if train_limit is not None:
        random.Random(seed).shuffle(train)
        train = train[:train_limit]
    return Task("sst2", train, read("dev.tsv"), ("negative", "positive"))
