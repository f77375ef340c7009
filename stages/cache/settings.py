"""Settings of the cache stage and its tools (torch- and onnxruntime-free: the CLI builds ``--help`` from them)."""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from pipeline.config import require, require_temperatures, setting
from pipeline.errors import UsageError
from pipeline.inference import DEVICES
from pipeline.soft import COMBINES

DIAG_BLOCK = 16384  # rows per block of diagnostics and tools: ~0.7 MB of logits per member at 10 classes
DIAG_BLOCK_BYTES = 16 << 20  # ... and at most this much float64 a block of targets holds at many classes


def diag_block(classes: int, members: int) -> int:
    """Rows per block of the diagnostics: DIAG_BLOCK, fewer where a block of float64 targets of every
    member would pass DIAG_BLOCK_BYTES (1000 classes: 699 rows at 3 members).  A function of the
    cache's shape alone, so one run, a resume and merged shards cut the same blocks."""
    return max(1, min(DIAG_BLOCK, DIAG_BLOCK_BYTES // (8 * classes * max(1, members))))
# Settings that do not change the content (the gate's only effect, a contract it takes, is recorded
# with the contracts), and member_weights, recorded normalised in the identity instead of as typed.
RUN_ONLY = ("device", "threads", "shard", "io_binding", "gate", "gate_rows", "gate_seed")
NOT_IN_SETTINGS = (*RUN_ONLY, "member_weights")
# pipeline.sanity_gate.MIN_LABELLED, the fewest labelled rows that can tell contracts apart (not imported:
# it loads onnx, which `--help` must not; tests/unit/test_sanity_gate.py checks that they are equal)
MIN_LABELLED = 100


def parse_shard(text: str) -> tuple[int, int]:
    """``"1/3"`` -> (1, 3); UsageError unless 0 <= i < n."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UsageError(f"shard must be i/n (e.g. 0/3), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise UsageError(f"shard must be i/n with 0 <= i < n, got {text!r}")
    return i, n


def require_weights(weights: tuple[float, ...]) -> None:
    """Each member weight finite and >= 0, not all 0 (their count is checked against the members)."""
    require(all(math.isfinite(w) and w >= 0 for w in weights) and (not weights or sum(weights) > 0),
            f"member_weights must be finite, >= 0 and not all 0, got {','.join(map(str, weights))}")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Run the teacher ensemble over the transfer set with onnxruntime and write the soft-target
    cache (kd-cache/2): per-member logits (or their top k), from which soft targets at any
    temperature are derived when read, and the diagnostics at each temperature."""

    FOOTPRINT: ClassVar[str] = "lower --batch-size (now {batch_size}): the stage holds a few batches of rows at a time"

    temperatures: tuple[float, ...] = setting((1.0, 2.0, 4.0, 8.0, 20.0), "temperatures to diagnose (and store soft "
                                                                          "targets at, with --store-soft); targets at "
                                                                          "any T are derived when read")
    combine: str = setting("arithmetic", "member combination: arithmetic (mean of softmaxes, Hinton) or "
                                         "geometric (softmax of mean logits)")
    member_weights: tuple[float, ...] = setting((), "one weight per ensemble member, in the order of the teachers' "
                                                    "outputs (normalised to sum 1): arithmetic "
                                                    "sum_m w_m softmax(v_m/T), geometric softmax(sum_m w_m v_m/T); "
                                                    "empty = equal")
    gate: bool = setting(True, "sanity gate: before caching, judge each teacher's soft targets on labelled transfer "
                               "rows under its input contract and the common alternatives; --no-gate keeps a "
                               "declaration it refuses, or a guessed contract where the split has no labels")
    gate_rows: int = setting(2048, f"labelled rows the gate draws from anywhere in the split (at least "
                                   f"{MIN_LABELLED}; all of them when fewer)")
    gate_seed: int = setting(0, "seed of the gate's draw of rows")
    split: str = setting("train", "split of the prepared file used as the transfer set")
    batch_size: int = setting(1024, "rows per onnxruntime call (also the commit unit and the CUDA bound size)")
    device: str = setting("auto", "auto (CUDA when onnxruntime can run it, else CPU, said aloud), cpu or cuda")
    threads: int = setting(2, "onnxruntime intra-op threads")
    io_binding: str = setting("auto", "bind inputs/outputs at a fixed padded batch: auto (on CUDA only), on, off")
    shard: str = setting("", "i/n: write part i of n (rows of a contiguous range of batches) to "
                             "<out stem>.part<i>of<n><suffix>; empty = RANK/WORLD_SIZE when set, else all rows")
    views: int = setting(0, "K views of every transfer row, made from 8 bytes of parameters each (view 0 is the "
                            "row itself; docs/design.md, views); 0 = the rows themselves, no views")
    view_max_shift: int = setting(2, "views: largest shift in pixels along each image axis")
    view_flip: float = setting(0.0, "views: probability of a horizontal flip")
    view_mixup: float = setting(0.0, "views: probability of mixing in a partner row (weight <= 0.5)")
    view_mixup_alpha: float = setting(1.0, "views: the partner's weight w is min(b, 1 - b), b ~ Beta(alpha, alpha)")
    view_seed: int = setting(0, "views: seed of every view's parameters")
    logits_dtype: str = setting("float16", "storage of the per-member logits: float16 (half the bytes; targets are "
                                           "derived from the rounded logits, which costs nothing measured: "
                                           "docs/results.md) or float32")
    store_soft: bool = setting(False, "also store the soft targets at every --temperatures (4 x classes bytes a row "
                                      "each, as kd-cache/1 did); without it they are derived when read")
    top_k: int = setting(0, "keep only the k classes of highest ensemble target at T=1 per row: their class ids, "
                            "each member's logits at them and each member's log-sum-exp of the rest; targets at "
                            "any T are rebuilt with the rest spread evenly, within a bound (pipeline/topk.py); "
                            "0 = every class")
    tail_prior_rows: int = setting(0, "a top-k cache: share each row's tail as the class prior says (the mean "
                                      "log-probabilities of the sampled rows with the same top class, stored once: "
                                      "C x C float32), from this many seeded transfer rows; 0 = the spread rule "
                                      "(the tail's mass spread evenly; pipeline/topk.py)")

    def __post_init__(self) -> None:
        require(len(self.temperatures) > 0, "give at least one temperature")
        require_temperatures(self.temperatures, "temperatures")
        require(len(set(self.temperatures)) == len(self.temperatures), "temperatures must be distinct")
        require(self.combine in COMBINES, f"combine must be one of {', '.join(COMBINES)}")
        require(self.split in ("train", "val", "test"), "split must be train, val or test")
        require(self.batch_size >= 1 and self.threads >= 1, "batch_size and threads must be >= 1")
        require(self.gate_rows >= MIN_LABELLED, f"gate_rows must be >= {MIN_LABELLED} (fewer rows cannot tell the "
                                                f"contracts apart); --no-gate skips the gate")
        require_weights(self.member_weights)
        require(self.device in DEVICES, f"device must be one of {', '.join(DEVICES)}")
        require(self.io_binding in ("auto", "on", "off"), "io_binding must be auto, on or off")
        if self.shard:
            parse_shard(self.shard)
        require(self.views >= 0, f"views must be >= 0 (K views per row; 0 = none), got {self.views}")
        require(self.logits_dtype in ("float32", "float16"), "logits_dtype must be float32 or float16")
        require(self.top_k >= 0, f"top_k must be >= 0 (0 = every class), got {self.top_k}")
        require(self.tail_prior_rows >= 0, f"tail_prior_rows must be >= 0, got {self.tail_prior_rows}")
        require(self.tail_prior_rows == 0 or self.top_k > 0, "tail_prior_rows needs --top-k (a prior shares a tail)")
        try:
            self.view_spec()
        except ValueError as e:
            raise UsageError(str(e)) from None

    def view_spec(self):
        """The views to make (a :class:`pipeline.views.ViewSpec`), or None for a plain cache."""
        from pipeline.views import ViewSpec

        if not self.views:
            return None
        return ViewSpec(count=self.views, max_shift=self.view_max_shift, flip=self.view_flip, mixup=self.view_mixup,
                        mixup_alpha=self.view_mixup_alpha, seed=self.view_seed)


@dataclasses.dataclass(frozen=True)
class AddTemperatureConfig:
    """Add soft targets at new temperatures to an existing cache from its stored logits (no
    teacher run), or recombine them all with new member weights; in place, or to --out. Refuses a
    cache without logits."""

    FOOTPRINT: ClassVar[str] = "lower --block-rows (now {block_rows})"

    temperatures: tuple[float, ...] = setting((), "temperatures to add, e.g. 3,5")
    member_weights: tuple[float, ...] = setting((), "new member weights (one per member, normalised): every stored "
                                                    "temperature is recomputed with them; empty = keep the cache's")
    block_rows: int = setting(DIAG_BLOCK, "rows read and written per block (bounds memory)")

    def __post_init__(self) -> None:
        require(len(self.temperatures) > 0 or len(self.member_weights) > 0,
                "give --temperatures (e.g. 3,5) or --member-weights")
        require_temperatures(self.temperatures, "temperatures")
        require_weights(self.member_weights)
        require(self.block_rows >= 1, "block_rows must be >= 1")


@dataclasses.dataclass(frozen=True)
class VerifyConfig:
    """Check a cache against its teachers and transfer set: recorded sha256 of each file, and a
    random sample of rows re-run through the teachers compared with the stored logits."""

    FOOTPRINT: ClassVar[str] = "lower --sample-rows (now {sample_rows})"

    sample_rows: int = setting(256, "rows to re-run (in `windows` random contiguous windows)")
    windows: int = setting(8, "number of random contiguous windows the sample is drawn in")
    seed: int = setting(0, "seed of the sample")
    tolerance: float = setting(1e-4, "largest |stored - recomputed| logit allowed, times max(1, max|logit|)")
    device: str = setting("cpu", "auto, cpu or cuda (CPU and CUDA logits differ by ~1e-6 relative)")
    threads: int = setting(2, "onnxruntime intra-op threads")

    def __post_init__(self) -> None:
        require(self.sample_rows >= 1 and self.windows >= 1, "sample_rows and windows must be >= 1")
        require(self.tolerance >= 0, "tolerance must be >= 0")


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """Join the parts of a sharded cache (`distill cache --shard i/n`) into one cache, after checking
    that every part exists, is complete, has the same provenance and that they cover the rows once."""

    FOOTPRINT: ClassVar[str] = "lower --block-rows (now {block_rows})"

    block_rows: int = setting(DIAG_BLOCK, "rows copied per block (bounds memory)")

    def __post_init__(self) -> None:
        require(self.block_rows >= 1, "block_rows must be >= 1")


@dataclasses.dataclass(frozen=True)
class CacheBenchConfig:
    """Rows/s of one teacher ensemble in onnxruntime vs PyTorch eager (side by side), and the
    share of the cache stage's wall time spent in HDF5 I/O."""

    FOOTPRINT: ClassVar[str] = "lower --rows (now {rows}) or --batch-size (now {batch_size})"

    rows: int = setting(4096, "rows of the synthetic transfer set")
    members: int = setting(3, "ensemble members")
    arch: str = setting("cnn:32-64-128", "member architecture (random weights: speed does not depend on them)")
    batch_size: int = setting(512, "rows per run() / forward()")
    threads: int = setting(2, "threads of onnxruntime and of torch (equal, for a fair ratio)")
    trials: int = setting(3, "alternating trials per runtime (median reported)")
    device: str = setting("cpu", "device of the stage run: cpu, cuda or auto")

    def __post_init__(self) -> None:
        require(min(self.rows, self.members, self.batch_size, self.threads, self.trials) >= 1, "sizes must be >= 1")


@dataclasses.dataclass(frozen=True)
class CacheScaleConfig:
    """Peak RSS and wall time of `distill cache` on synthetic transfer sets of growing size."""

    FOOTPRINT: ClassVar[str] = "lower --sizes (now {sizes}) or --batch-size (now {batch_size})"

    sizes: tuple[int, ...] = setting((10_000, 100_000, 1_000_000), "transfer-set rows, one run each (empty = none)")
    features: int = setting(784, "float32 features per row")
    classes: int = setting(10, "classes of the synthetic teacher")
    members: int = setting(1, "members of the synthetic teacher (one output [batch, members, classes])")
    hidden: int = setting(0, "tanh units before each member's linear layer (0: linear features -> classes)")
    top_k: int = setting(0, "the cache's --top-k (0 = every class)")
    logits_dtype: str = setting("float16", "the cache's --logits-dtype")
    store_soft: bool = setting(False, "the cache's --store-soft")
    batch_size: int = setting(1024, "rows per batch (the stage's default; 10k rows then fill the pipeline too)")
    threads: int = setting(2, "onnxruntime threads")
    device: str = setting("cpu", "cpu, cuda or auto")
    keep: bool = setting(False, "keep the synthetic files (GBs at 1M rows) in the work folder")
    views: tuple[int, ...] = setting((1, 4, 16, 64), "K views per row of one view_rows-row set of images: time per "
                                                    "view and peak RSS against K (empty = none)")
    view_rows: int = setting(10_000, "transfer rows of the views runs (each run caches view_rows x K views)")
    view_totals: tuple[int, ...] = setting((), "views cached per views run instead (total / K rows each), one set "
                                                "of runs per total; empty = view_rows rows for every K")
    view_image: int = setting(28, "side of the views runs' square one-channel images (features = side^2)")

    def __post_init__(self) -> None:
        require(min(self.sizes, default=1) >= 1 and min(self.view_totals, default=1) >= 1,
                "sizes and view_totals must be >= 1")
        require(min(self.classes, self.members) >= 1 and self.hidden >= 0, "classes and members must be >= 1")
        require(0 <= self.top_k < self.classes, "top_k must lie in [0, classes)")
        require(self.logits_dtype in ("float32", "float16"), "logits_dtype must be float32 or float16")
        require(min(self.views, default=1) >= 1 and self.view_rows >= 1 and self.view_image >= 5,
                "views and view_rows must be >= 1, view_image >= 5")
