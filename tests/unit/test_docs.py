"""The docs' figures against the files in the repository they name as their source.

Figures read from files under data/ (not tracked) cannot be checked here; docs/results.md marks
them *not kept* and names the command that writes them again.  What is in the repository is checked:
every file the docs name exists, the GPU figures are those of docs/gpu/, the sizes those of
docs/sources/, and no reconciliation is left as a TODO.
"""
import json
import re

import pytest

from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "docs" / "sources" / "README.md",
        *sorted((ROOT / "docs" / "checks").glob("*.md"))]
GPU = ROOT / "docs" / "gpu"
SOURCES = ROOT / "docs" / "sources"


def _text(name: str) -> str:
    return (ROOT / name).read_text()


def _named_paths(doc):
    """Repository paths a doc names: in backquotes (``docs/gpu/x.log``) or as Markdown link targets."""
    text = doc.read_text()
    for token in re.findall(r"`([^`\s]+)`", text) + re.findall(r"\]\(([^)\s]+)\)", text):
        token = token.split("#")[0].split("::")[0].rstrip(".,;:")
        if not token or any(c in token for c in "*{}<>$") or token.startswith(("http", "data/", "/")):
            continue
        if token.startswith(("docs/", "scripts/", "tests/", "commands/", "pipeline/", "stages/")):
            yield token, ROOT / token
        elif doc.parent != ROOT and re.match(r"(\.\./|sources/|gpu/|bench/|runs/)", token):
            yield token, (doc.parent / token).resolve()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_the_docs_name_exists(doc):
    missing = [token for token, path in _named_paths(doc) if not path.exists()]
    assert not missing, f"{doc.name} names files that are not in the repository: {missing}"


def test_no_reconciliation_left_as_a_todo():
    for doc in DOCS:
        assert not re.search(r"TODO\(issue \d+\)", doc.read_text()), doc


def test_gpu_table_is_the_json_files():
    rows = [line.strip().split("|") for line in _text("docs/gpu.md").splitlines()
            if line.strip().startswith("| `bench-cache-")]
    assert len(rows) == 3
    for cells in rows:
        name = cells[1].strip().strip("`")
        r = json.loads((GPU / name).read_text())
        device, threads = cells[3].strip().split(", ")
        assert (device, int(threads)) == (r["settings"]["device"], r["threads"]), name
        want = [r["rows_per_s"]["onnxruntime"], r["rows_per_s"]["torch_eager"], r["ort_over_torch"],
                r["stage"]["hdf5_io_share"]]
        assert [float(c) for c in cells[4:8]] == want, name
        assert r["rows"] == 16384 and r["settings"]["batch_size"] == 1024  # "16,384 rows at batch 1024"


# (doc, what the doc says, source file, what the source says): each figure quoted from a log
CLAIMS = [
    ("docs/gpu.md", "`CUDA vs CPU: max |logit diff| 0.000217`", "docs/gpu/cache-check-h200.log",
     "max |logit diff| 0.000217"),
    ("docs/gpu.md", "0.000136 against a tolerance of 0.0001", "docs/gpu/cache-check-h200.log",
     "max |logit diff| 0.000136 (tolerance 0.0001)"),
    ("docs/gpu.md", "3.58 s on CUDA", "docs/gpu/cache-check-h200.log", "100000 rows x CUDAExecutionProvider in 3.58 s"),
    ("docs/gpu.md", "21.77 s on the CPU", "docs/gpu/cache-check-h200.log",
     "100000 rows x CPUExecutionProvider in 21.77 s"),
    ("docs/gpu.md", "`killed at committed_rows 40960`", "docs/gpu/cache-check-h200.log",
     "killed at committed_rows 40960"),
    ("docs/gpu.md", "`resumed == uninterrupted (digest): True`", "docs/gpu/cache-check-h200.log",
     "resumed == uninterrupted (digest): True"),
    ("docs/gpu.md", "CPU max |logit diff| 3.427267074584961e-07", "docs/gpu/cache-no-tf32-h200.txt",
     "CUDA vs CPU max |logit diff| 3.427267074584961e-07"),
    ("docs/gpu.md", "1.94e-07 and 2.83e-07", "docs/gpu/cache-no-tf32-h200.txt",
     "CPUExecutionProvider: max |logit diff| 2.83e-07"),
    ("docs/gpu.md", "1.94e-07 and 2.83e-07", "docs/gpu/cache-no-tf32-h200.txt",
     "CUDAExecutionProvider: max |logit diff| 1.94e-07"),
    ("docs/gpu.md", "2.17 s on CUDA", "docs/gpu/cache-no-tf32-h200.txt",
     "50000 rows x CUDAExecutionProvider in 2.17 s"),
    ("docs/gpu.md", "2.49 s on the CPU provider with 16 threads", "docs/gpu/cache-no-tf32-h200.txt", "--threads 16"),
    ("docs/gpu.md", "2.49 s on the CPU", "docs/gpu/cache-no-tf32-h200.txt",
     "50000 rows x CPUExecutionProvider in 2.49 s"),
    ("docs/gpu.md", "HDF5 I/O 21.0% of a 0.51 s stage, 15.3% not overlapped", "docs/gpu/cache-no-tf32-h200.txt",
     "HDF5 I/O 21.0% of the stage's 0.51 s (not overlapped: 15.3%)"),
    ("docs/gpu.md", "81.5 us against 18.2 us", "docs/gpu/bench-student-h200.txt",
     "fp32   CUDAExecutionProvider        1       81.5"),
    ("docs/gpu.md", "81.5 us against 18.2 us", "docs/gpu/bench-student-h200.txt",
     "fp32   CPUExecutionProvider         1       18.2"),
    ("docs/gpu.md", "52.9 us against 575 us", "docs/gpu/bench-student-h200.txt",
     "fp32   CUDAExecutionProvider      256       52.9"),
    ("docs/gpu.md", "52.9 us against 575 us", "docs/gpu/bench-student-h200.txt",
     "fp32   CPUExecutionProvider       256      575.1"),
    ("docs/gpu.md", "1.06x and 1.35x", "docs/gpu/bench-student-h200.txt", "fp16/fp32 on CUDA p50 ratio 1.06"),
    ("docs/gpu.md", "1.06x and 1.35x", "docs/gpu/bench-student-h200.txt", "fp16/fp32 on CUDA p50 ratio 1.35"),
    ("docs/results.md", "1.126x and 1.014x in the message of commit 77eb80c", "docs/results.md",
     "77eb80c^:stages/loader.py"),
]


@pytest.mark.parametrize("doc, says, source, source_says", CLAIMS, ids=[f"{c[0]}: {c[1][:40]}" for c in CLAIMS])
def test_quoted_figures_are_in_their_source(doc, says, source, source_says):
    assert says in _text(doc), f"{doc} no longer says {says!r}"
    assert source_says in _text(source), f"{source} does not say {source_says!r}"


def test_gpu_json_figures_quoted_in_the_text():
    r = json.loads((GPU / "bench-cache-cuda.json").read_text())
    gpu = _text("docs/gpu.md")
    assert f"`hdf5_io_share` {r['stage']['hdf5_io_share']:.4f}, `wall_s` {r['stage']['wall_s']:.3f}" in gpu
    assert f"`io_stall_share` {r['stage']['io_stall_share']:.3f}" in gpu
    assert f"`max_abs_diff_ort_vs_torch` {r['max_abs_diff_ort_vs_torch']:.1e}".replace("e-0", "e-") in gpu
    assert f"{r['rows_per_s']['onnxruntime'] / 1e3:.0f}k rows/s against PyTorch eager at " \
           f"{r['rows_per_s']['torch_eager'] / 1e3:.0f}k" in gpu and f"({r['ort_over_torch']:.2f}x" in gpu


def test_sizes_are_those_of_the_copied_files():
    sizes = json.loads((SOURCES / "baseline-ref" / "sizes.json").read_text())
    for name, s in sizes.items():  # as the command in docs/sources/README.md writes them
        assert s["KiB"] == round(s["bytes"] / 1024, 1), name
    results, readme = _text("docs/results.md"), _text("README.md")
    for name in ("fashion-mnist-kd.int8.onnx", "fashion-mnist-hard.int8.onnx"):
        assert sizes[name]["KiB"] == 105.5
    assert "| distilled student, int8 (static QDQ) | 89.64% | 92.54% | 8.4 | 18.7 | 5.6 | 105.5 |" in results + readme
    assert f"{sizes['fashion-mnist-kd.raw.int8.onnx']['KiB']} KiB (raw-pixel int8" in results.replace("\n", " ")
    assert f"{sizes['fashion-mnist-kd.onnx']['KiB']} KiB\n(fp32)" in results or \
        f"{sizes['fashion-mnist-kd.onnx']['KiB']} KiB (fp32)" in results.replace("\n", " ")
    assert "107.6 KiB" not in results.split("**The int8 size.**")[0]  # only in the note that explains it
    metrics = json.loads((SOURCES / "baseline-ref" / "fashion-mnist-kd.metrics.json").read_text())
    assert f"{metrics['parameters']:,} parameters" in results


def _table_rows(text: str, first_cell: str) -> list[list[str]]:
    """The cells of each Markdown table row of ``text`` whose first cell starts with ``first_cell``."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and line.strip("| ").startswith(first_cell)]


def test_readme_headline_table_is_the_kept_make_all_report():
    """The README's headline rows are those of the make-all report it names: accuracy and agreement
    from the report's models table, the batch-1 one-thread p50/p99 (`run`) and IOBinding p50 from its
    latency table, and the size."""
    readme = _text("README.md")
    report_dir = re.search(r"kept as\s+\[(docs/runs/[^]]+/make-all/)\]", readme).group(1)
    report = _text(report_dir + "fashion-mnist.md")
    latency = report.split("## Latency at batch 1")[1].split("\n## ")[0]
    rows = {"teacher ensemble": "teacher-ensemble", "hard-label student": "student-hard",
            "distilled student (mlp": "student-kd", "distilled student, int8": "student-kd-int8",
            "**edge model**": "student-kd-int8-raw"}
    for label, model in rows.items():
        (mine,) = _table_rows(readme.split("## Results")[1].split("## Using")[0], label)
        (theirs,) = [r for r in _table_rows(report, model) if r[0] == model and r[1] == "onnxruntime"]
        assert mine[1:3] == theirs[5:7] and mine[6] == theirs[4].split()[0], (label, mine, theirs)
        (run,) = [r for r in _table_rows(latency, model) if r[0] == model and r[1] == "1"]
        (iob,) = [r for r in _table_rows(latency, model + "-iobinding") if r[1] == "1"]
        assert mine[3:6] == [run[2], run[4], iob[2]], (label, mine, run, iob)
