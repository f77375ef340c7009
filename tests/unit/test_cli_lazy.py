"""``distill --help`` and every ``distill <command> --help`` load neither torch nor onnxruntime (nor
Pillow): a command imports its stage's code only when it runs (commands/)."""
import json
import subprocess
import sys

from tests.conftest import ROOT

COMMANDS = [[], ["prepare"], ["jitter"], ["teacher"], ["cache"], ["cache", "build"], ["cache", "add-temperature"],
            ["cache", "verify"], ["cache", "merge"], ["cache", "bench"], ["cache", "bench-scale"], ["student"],
            ["student", "train"], ["student", "sweep"], ["student", "experiment"], ["student", "bench"], ["export"],
            ["bench"], ["bench", "run"], ["bench", "pick"], ["bench-fidelity"]]

PROBE = """
import json, sys
from commands.main import main
out = {}
for args in json.loads(sys.argv[1]):
    try:
        main([*args, "--help"], standalone_mode=False)
    except SystemExit:
        pass
    out[" ".join(args)] = sorted(m for m in ("torch", "onnxruntime", "onnx", "matplotlib", "PIL") if m in sys.modules)
print("RESULT " + json.dumps(out))
"""


def test_help_loads_neither_torch_nor_onnxruntime():
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(COMMANDS)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert set(result) == {" ".join(c) for c in COMMANDS}
    for command, loaded in result.items():
        assert loaded == [], f"distill {command} --help loaded {loaded}"


def test_the_probe_sees_a_heavy_import():
    """The control: running a stage's code does load torch, so the check above can fail."""
    proc = subprocess.run([sys.executable, "-c", "import sys; from stages.student import distill_student; "
                           "print('torch' in sys.modules)"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "True", proc.stderr[-2000:]
