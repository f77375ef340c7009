"""``--help`` against what the code runs: the optimiser and learning-rate schedule a training stage
constructs, recorded from a short real run, are the ones its options' help names, and no other.

Recording patches the base classes' constructors (``torch.optim.Optimizer`` and
``torch.optim.lr_scheduler.LRScheduler``), so whatever class a stage builds is seen, however it is
built.  Names in the help are matched against a vocabulary: every optimiser class of ``torch.optim``
by its class name (``Adam`` is not ``AdamW``), every schedule by its class name or the words the docs
use for it (``one-cycle``).  A choice setting (``optimizer``: each value it accepts is run) is read only
for the description of the value in force, ``value (description)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re

import click
import pytest
import torch

from pipeline.errors import UsageError

OPTIMIZERS = {name: rf"\b{name}\b" for name, cls in vars(torch.optim).items()
              if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer}
# The words for a schedule.  "cosine annealing" is one-cycle's own second phase (Smith & Topin 2019),
# so it names no schedule; "cosine-decayed" / "cosine decay" is CosineAnnealingLR.
SCHEDULES = {
    "OneCycleLR": r"\bone-cycle\b|\bOneCycleLR\b",
    "CosineAnnealingLR": r"\bcosine[- ]decay(ed)?\b|\bCosineAnnealingLR\b",
    "CosineAnnealingWarmRestarts": r"\bwarm restarts\b|\bCosineAnnealingWarmRestarts\b",
    "StepLR": r"\bstep decay\b|\bStepLR\b",
    "MultiStepLR": r"\bmulti-step\b|\bMultiStepLR\b",
    "ExponentialLR": r"\bexponential(ly)? deca(y|yed)\b|\bExponentialLR\b",
    "LinearLR": r"\blinear(ly)? (decay|decayed|warm-up)\b|\bLinearLR\b",
    "PolynomialLR": r"\bpolynomial\b|\bPolynomialLR\b",
    "ReduceLROnPlateau": r"\bon plateau\b|\bReduceLROnPlateau\b",
}
CHOICES = {"optimizer": OPTIMIZERS}  # settings that choose among a vocabulary's classes


def named(text: str, vocab: dict[str, str]) -> set[str]:
    return {name for name, pattern in vocab.items() if re.search(pattern, text)}


def described(text: str, value: str) -> str | None:
    """The description of ``value`` in a choice setting's help (``adam (Adam, ...) or sgd (SGD ...)``)."""
    m = re.search(rf"\b{re.escape(value)}\s*\(([^()]*)\)", text)
    return m.group(1) if m else None


def lies(helps: dict[str, str], built: set[str], chosen: dict[str, str] | None = None) -> list[str]:
    """What the help of a command's options says that a run which built the classes ``built`` did not
    do: a class named but not built, a class built but named nowhere.  ``chosen``: the value of each
    choice setting in force (its help is read for that value's description only)."""
    chosen = chosen or {}
    found, texts = [], {}
    for option, text in helps.items():
        if option in chosen:  # a choice setting: the description of the value in force
            text = described(text, chosen[option])
            if text is None:
                found.append(f"--{_flag(option)}: its help does not describe {chosen[option]!r}")
                continue
        texts[option] = text
    for vocab in (OPTIMIZERS, SCHEDULES):
        made, said = built & set(vocab), set()
        for option, text in texts.items():
            words = named(text, vocab)
            found += [f"--{_flag(option)}: says {w}, the code built {', '.join(sorted(made)) or 'none'}"
                      for w in sorted(words - made)]
            said |= words
        found += [f"the code built {m}, which no option's help names" for m in sorted(made - said)]
    return found


def _flag(option: str) -> str:
    return option.replace("_", "-")


@contextlib.contextmanager
def recording():
    """The names of the optimiser and scheduler classes constructed inside the block."""
    built: set[str] = set()
    opt_init, sched_init = torch.optim.Optimizer.__init__, torch.optim.lr_scheduler.LRScheduler.__init__

    def opt(self, *a, **k):
        built.add(type(self).__name__)
        opt_init(self, *a, **k)

    def sched(self, *a, **k):
        built.add(type(self).__name__)
        sched_init(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.Optimizer, "__init__", opt)
        mp.setattr(torch.optim.lr_scheduler.LRScheduler, "__init__", sched)
        yield built


def option_helps(cmd: click.Command) -> dict[str, str]:
    """Each visible option's help, as ``--help`` prints it, by setting name."""
    return {p.name: p.help or "" for p in cmd.params if isinstance(p, click.Option) and not p.hidden}


def choice_values(settings: type, field: str, vocab: dict[str, str]) -> list[str]:
    """The values of choice setting ``field`` that ``settings`` accepts, among its vocabulary's names
    in lower case (``adam``, ``sgd``, ...)."""
    values = []
    for name in vocab:
        try:
            settings(**{field: name.lower()})
        except UsageError:
            continue
        values.append(name.lower())
    assert values, f"{settings.__name__}.{field} accepts none of {sorted(vocab)}"
    return values


def variants(settings: type) -> list[dict[str, str]]:
    """One run per value of each choice setting (none: one run with the defaults)."""
    fields = {f.name for f in dataclasses.fields(settings)}
    runs = [{}]
    for field, vocab in CHOICES.items():
        if field in fields:
            runs = [{**r, field: v} for r in runs for v in choice_values(settings, field, vocab)]
    return runs


QUIET = dict(log=lambda m: None)


def _teacher(tmp_path, prepared, **chosen):
    from stages.teacher import TeacherConfig, train_teachers

    train_teachers(TeacherConfig(members=1, arch="mlp:8", epochs=1, threads=1, **chosen), prepared,
                   tmp_path / "ensemble.onnx", **QUIET)


def _student(tmp_path, cache, prepared, **chosen):
    from stages.student import StudentConfig, distill_student

    distill_student(StudentConfig(arch="mlp:8", epochs=1, **chosen), cache, prepared, tmp_path / "s.ckpt",
                    tmp_path / "s.metrics.json", **QUIET)


def test_teacher_help_names_what_it_builds(tmp_path, tiny_prepared):
    from commands.teacher import teacher
    from stages.teacher.settings import TeacherConfig

    for chosen in variants(TeacherConfig):
        with recording() as built:
            _teacher(tmp_path, tiny_prepared, **chosen)
        assert built, "the teacher's run built no optimiser"
        assert not lies(option_helps(teacher), built, chosen), chosen


def test_student_help_names_what_it_builds(tmp_path, tiny_cache, tiny_prepared):
    from commands.student import student_sweep, student_train
    from stages.student.settings import StudentConfig

    for chosen in variants(StudentConfig):
        with recording() as built:
            _student(tmp_path, tiny_cache, tiny_prepared, **chosen)
        assert built, "the student's run built no optimiser"
        assert not lies(option_helps(student_train), built, chosen), chosen
        # a sweep trains StudentConfigs (SweepConfig.students) with the student stage: the same classes
        assert not lies(option_helps(student_sweep), built, chosen), chosen


# ---- the checker itself, on the help texts the commands had when they said what the code did not do
def test_lies_finds_a_wrong_optimizer_and_a_wrong_schedule():
    built = {"AdamW", "OneCycleLR"}
    assert lies({"lr": "AdamW learning rate (one-cycle schedule)"}, built) == []
    assert lies({"lr": "Adam learning rate (one-cycle schedule)"}, built) == [
        "--lr: says Adam, the code built AdamW", "the code built AdamW, which no option's help names"]
    teacher = {"lr": "Adam learning rate (cosine-decayed to 0 over the epochs)", "weight_decay": "Adam weight decay"}
    assert lies(teacher, {"Adam", "OneCycleLR"}) == [
        "--lr: says CosineAnnealingLR, the code built OneCycleLR",
        "the code built OneCycleLR, which no option's help names"]
    # one-cycle's second phase is cosine annealing: naming it is no claim of another schedule
    assert lies({"lr": "Adam peak learning rate of the one-cycle schedule, then cosine annealing to lr/25e4"},
                {"Adam", "OneCycleLR"}) == []
    assert lies({"lr": "SGD learning rate"}, {"SGD"}) == []
    assert lies({"lr": "SGD learning rate (one-cycle)"}, {"SGD"}) == ["--lr: says OneCycleLR, the code built none"]


def test_lies_reads_a_choice_setting_for_the_value_in_force():
    helps = {"optimizer": "adam (Adam, L2 weight decay) or sgd (SGD with Nesterov momentum 0.9)",
             "lr": "peak learning rate of the one-cycle schedule"}
    assert lies(helps, {"Adam", "OneCycleLR"}, {"optimizer": "adam"}) == []
    assert lies(helps, {"SGD", "OneCycleLR"}, {"optimizer": "sgd"}) == []
    assert lies(helps, {"AdamW", "OneCycleLR"}, {"optimizer": "adam"}) == [
        "--optimizer: says Adam, the code built AdamW", "the code built AdamW, which no option's help names"]
    assert lies(helps, {"RMSprop", "OneCycleLR"}, {"optimizer": "rmsprop"}) == [
        "--optimizer: its help does not describe 'rmsprop'", "the code built RMSprop, which no option's help names"]
    # a plain option must hold for every value: "Adam weight decay" is untrue when sgd runs
    helps["weight_decay"] = "Adam weight decay"
    assert lies(helps, {"SGD", "OneCycleLR"}, {"optimizer": "sgd"}) == ["--weight-decay: says Adam, the code built SGD"]
