"""Settings of the student stage's commands: train, sweep, experiment, bench (torch-free: the CLI
builds ``--help`` from them, and a sweep's grid is checked before any worker starts)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from pipeline.config import require, require_temperatures, setting
from pipeline.runtime import PRECISIONS
from pipeline.specs import parse_spec

OBJECTIVES = ("kd", "logits")
TOPK_TAILS = ("rebuilt", "bucket")
EXPERIMENTS = ("small-transfer", "omitted-class")


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """Train a student from the soft-target cache with
    alpha*T^2*KL(p_T || q_T) + (1-alpha)*CE(y, q_1); the epoch is selected on validation accuracy."""

    FOOTPRINT: ClassVar[str] = ("lower --memory-budget-mib (now {memory_budget_mib}) so the "
                                "rows are streamed in blocks, or --batch-size (now {batch_size})")

    arch: str = setting("mlp:128", "student architecture spec (pipeline/specs.py): mlp:64 is 784-64-10, mlp:800-800 "
                                   "Hinton's; conv:16-32/2-64/2 plain and dws:16-32/2-64/2-128/2 depthwise-separable "
                                   "CNNs (C/2: stride 2)")
    temperature: float = setting(2.0, "distillation temperature T (targets at any T are derived from the cache's "
                                           "logits; a cache without logits must store them at T)")
    alpha: float = setting(0.5, "weight of the soft term; 0 = hard labels only, 1 = soft targets only")
    objective: str = setting("kd", "kd (tempered soft targets) or logits (match zero-meaned mean logits)")
    topk_tail: str = setting("rebuilt", "a top-k cache (objective kd): rebuilt (learn the targets its rule rebuilds, "
                                        "the tail's mass spread over the other classes) or bucket (learn the kept "
                                        "classes and the tail's total mass only: KL over k + 1 outcomes, "
                                        "pipeline/losses.py)")
    epochs: int = setting(30, "training epochs")
    batch_size: int = setting(128, "minibatch rows")
    lr: float = setting(1e-3, "AdamW's peak learning rate of the one-cycle schedule: warm-up from lr/25 over the first "
                              "30% of the steps, then cosine annealing to lr/25e4 (Smith & Topin 2019)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    seed: int = setting(0, "seed of initialisation and batch order")
    threads: int = setting(1, "torch threads (one trains a small MLP fastest on 2 shared cores)")
    memory_budget_mib: float = setting(1024.0, "MiB the training rows may hold in memory (float32 x, target, "
                                               "label); a larger cache is streamed in contiguous blocks")
    block_rows: int = setting(8192, "rows per contiguous read when streaming (and when loading)")
    train_fraction: float = setting(1.0, "use a seeded fraction of the transfer rows (0.03: Hinton's 3%)")
    drop_class: int = setting(-1, "leave the rows labelled with this class out of the transfer set (-1: none)")
    subset_seed: int = setting(0, "seed of the train_fraction sample (fixed apart from seed: one subset, many runs)")
    views_used: int = setting(0, "a views cache: draw each epoch's view of a row from its first K' views only "
                                 "(0 = all K; 1 = the rows themselves)")
    precision: str = setting("fp32", "arithmetic of training: fp32, bf16 (autocast, weights stay float32; fast only "
                                     "on CPUs with bfloat16 instructions) or auto (bf16 where the CPU has them)")
    mixup: float = setting(0.0, "probability that a training row is mixed with a partner row of its batch (weight "
                                "U(0, 1/2)) and its soft target with the partner's alike: no teacher sees the mixed "
                                "image, unlike a views cache's --view-mixup; the label stays the row's own (0 = off)")

    def __post_init__(self) -> None:
        require_temperatures(self.temperature)
        require(0.0 <= self.alpha <= 1.0, f"alpha must lie in [0, 1], got {self.alpha}")
        require(self.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}")
        require(self.topk_tail in TOPK_TAILS, f"topk_tail must be one of {', '.join(TOPK_TAILS)}")
        require(self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be >= 1")
        require(self.lr > 0 and self.weight_decay >= 0, "lr must be > 0 and weight_decay >= 0")
        require(self.memory_budget_mib > 0 and self.block_rows >= 1, "memory_budget_mib and block_rows must be > 0")
        require(0 < self.train_fraction <= 1, f"train_fraction must lie in (0, 1], got {self.train_fraction}")
        require(self.views_used >= 0, f"views_used must be >= 0 (0 = all views), got {self.views_used}")
        require(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}")
        require(0.0 <= self.mixup <= 1.0, f"mixup must lie in [0, 1], got {self.mixup}")
        require(self.mixup == 0 or (self.objective == "kd" and self.topk_tail == "rebuilt"),
                "mixup mixes soft targets: it needs objective kd and topk_tail rebuilt")
        parse_spec(self.arch)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Train students over a grid of temperatures, alphas, sizes and seeds from one cache (the
    hard-label baseline, alpha 0, always included) and write a CSV, a Markdown table and a plot."""

    FOOTPRINT: ClassVar[str] = ("lower --jobs (now {jobs}) or --memory-budget-mib (now "
                                "{memory_budget_mib}): each job holds its own rows")

    temperatures: tuple[float, ...] = setting((1.0, 2.0, 4.0, 8.0, 20.0), "temperatures (targets derived from the "
                                                                          "cache's logits)")
    alphas: tuple[float, ...] = setting((0.5, 0.9), "soft-term weights > 0 (alpha 0, hard labels, is always added)")
    archs: tuple[str, ...] = setting(("mlp:128", "mlp:800-800"), "student sizes (architecture specs)")
    seeds: tuple[int, ...] = setting((0, 1, 2), "seeds; the table reports mean and spread over them")
    epochs: int = setting(30, "training epochs of every student (the epoch is chosen on validation)")
    batch_size: int = setting(128, "minibatch rows")
    lr: float = setting(1e-3, "AdamW's peak learning rate of every student's one-cycle schedule (as in "
                              "`distill student --lr`)")
    weight_decay: float = setting(0.0, "AdamW weight decay of every student (as in `distill student --weight-decay`)")
    mixup: float = setting(0.0, "every student's `distill student --mixup`: probability that a row is mixed with "
                                "a partner row of its batch, soft targets alike (the hard baseline's inputs "
                                "too; 0 = off)")
    objective: str = setting("kd", "kd or logits (logits ignores the temperature)")
    train_fraction: float = setting(1.0, "fraction of the transfer rows every student uses")
    memory_budget_mib: float = setting(1024.0, "memory budget of each job's loader (MiB)")
    jobs: int = setting(2, "students trained at once, each in its own process with one torch thread")
    views_used: tuple[int, ...] = setting((0,), "a views cache: K' values, each student drawing from its rows' first "
                                                "K' views (0 = all)")
    view_epochs: tuple[int, ...] = setting((), "epochs for each views_used value, in order (patience grows with "
                                                "K'); empty = `epochs` for all")

    def __post_init__(self) -> None:
        require(len(self.temperatures) > 0, "give at least one temperature")
        require_temperatures(self.temperatures, "temperatures")
        require(all(0 < a <= 1 for a in self.alphas), "alphas must lie in (0, 1]; the baseline alpha 0 is added")
        require(len(self.archs) > 0 and len(self.seeds) > 0, "give at least one arch and one seed")
        require(self.jobs >= 1, "jobs must be >= 1")
        require(len(self.views_used) > 0 and min(self.views_used) >= 0, "views_used must be >= 0")
        require(not self.view_epochs or len(self.view_epochs) == len(self.views_used),
                "view_epochs needs one epoch count per views_used value")
        require(min(self.view_epochs, default=1) >= 1, "view_epochs must be >= 1")
        for arch in self.archs:  # fail before any job starts
            StudentConfig(arch=arch, weight_decay=self.weight_decay, mixup=self.mixup, objective=self.objective)

    def students(self) -> list[StudentConfig]:
        base = dict(batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay, mixup=self.mixup,
                    objective=self.objective,
                    train_fraction=self.train_fraction, memory_budget_mib=self.memory_budget_mib, threads=1)
        epochs = self.view_epochs or (self.epochs,) * len(self.views_used)
        out = []
        for arch in self.archs:
            for used, ep in zip(self.views_used, epochs):
                for seed in self.seeds:
                    one = dict(arch=arch, seed=seed, views_used=used, epochs=ep, **base)
                    # The baseline's T is never read (alpha 0); the first temperature keeps the check cheap.
                    out.append(StudentConfig(alpha=0.0, temperature=self.temperatures[0], **one))
                    out += [StudentConfig(alpha=a, temperature=t,
                                          **one) for t in self.temperatures for a in self.alphas]
        return out


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Run one of the paper's transfer-set experiments (small-transfer: 3% of the rows, hard vs soft,
    with and without early stopping; omitted-class: one class left out, errors on it before and
    after a bias correction fitted on validation data) and write its Markdown table."""

    FOOTPRINT: ClassVar[str] = "lower --jobs (now {jobs}): each job holds its own rows"

    name: str = setting("small-transfer", "small-transfer or omitted-class")
    arch: str = setting("mlp:800-800", "student architecture (Hinton's 784-800-800-10 by default)")
    temperature: float = setting(4.0, "distillation temperature (derived from the cache's logits)")
    alpha: float = setting(0.5, "soft-term weight of the distilled students (their hard twins use 0)")
    train_fraction: float = setting(0.03, "small-transfer: fraction of the transfer rows kept")
    drop_class: int = setting(3, "omitted-class: the class left out of the transfer set")
    epochs: int = setting(30, "training epochs")
    batch_size: int = setting(128, "minibatch rows")
    seeds: tuple[int, ...] = setting((0, 1, 2), "seeds; tables report mean and spread over them")
    jobs: int = setting(2, "students trained at once (spawned processes, one torch thread each)")

    def __post_init__(self) -> None:
        require(self.name in EXPERIMENTS, f"name must be one of {', '.join(EXPERIMENTS)}")
        require(0 < self.alpha <= 1, "alpha must lie in (0, 1]: the hard-label twin is added")
        require(len(self.seeds) > 0 and self.jobs >= 1, "give at least one seed; jobs >= 1")
        StudentConfig(arch=self.arch, temperature=self.temperature, train_fraction=self.train_fraction)

    def students(self) -> list[StudentConfig]:
        subset = (dict(train_fraction=self.train_fraction) if self.name == "small-transfer"
                  else dict(drop_class=self.drop_class))
        return [StudentConfig(arch=self.arch, temperature=self.temperature, alpha=a, epochs=self.epochs,
                              batch_size=self.batch_size, seed=s, threads=1, **subset)
                for s in self.seeds for a in (0.0, self.alpha)]


@dataclasses.dataclass(frozen=True)
class StudentBenchConfig:
    """Time student epochs from the cache, from arrays in memory and with the teacher run online,
    side by side in one run; write JSON with the ratios."""

    FOOTPRINT: ClassVar[str] = "lower --rows (now {rows}; 0 = all)"

    arch: str = setting("mlp:128", "student architecture")
    temperature: float = setting(4.0, "temperature (derived from the cache's logits)")
    alpha: float = setting(0.5, "soft-term weight")
    rows: int = setting(0, "use the first this many transfer rows (0 = all)")
    epochs: int = setting(3, "timed epochs per mode (interleaved); the median is reported")
    batch_size: int = setting(128, "minibatch rows")
    stream_budget_mib: float = setting(16.0, "memory budget of the streaming mode (MiB; at most half the rows' size)")
    threads: int = setting(1, "torch threads (and onnxruntime threads in online mode)")

    def __post_init__(self) -> None:
        require(self.rows >= 0 and self.epochs >= 1, "rows must be >= 0 and epochs >= 1")
        require(self.stream_budget_mib > 0, "stream_budget_mib must be > 0")
        StudentConfig(arch=self.arch, temperature=self.temperature, alpha=self.alpha)
