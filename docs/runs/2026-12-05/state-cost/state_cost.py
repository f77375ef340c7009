"""What a student's per-epoch training state costs against its epoch, 2026-12-05, AVX2 host.

For each student architecture: a net with AdamW and the one-cycle schedule after STEPS steps of
batch 128 (so the optimizer holds its moments), then (a) STEPS more steps timed, scaled to an epoch
of 55,000 rows (430 steps), and (b) ``pipeline.resume.save`` timed: the write, seal and fsync that
`distill student` does after every epoch (with the best weights in the run record, as in a real run).
Rounds interleave the architectures; medians over ROUNDS. One torch thread.
Run from a clone's root: .venv/bin/python docs/runs/2026-12-05/state-cost/state_cost.py OUT.json
"""
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline import models, resume

ARCHS = ["mlp:32", "mlp:128", "mlp:800-800", "conv:32/2-64/2-128/2", "res:16x1-32x1-64x1"]
STEPS, ROUNDS, BATCH, ROWS = 20, 5, 128, 55_000


def setup(arch):
    torch.manual_seed(0)
    net = models.build(arch, (1, 28, 28), 10)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=10_000)
    return net, opt, sched


def steps(net, opt, sched, n):
    x, y = torch.randn(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    t = time.perf_counter()
    for _ in range(n):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        sched.step()
    return time.perf_counter() - t


def main(out):
    torch.set_num_threads(1)
    nets = {a: setup(a) for a in ARCHS}
    for a in ARCHS:
        steps(*nets[a], STEPS)  # Adam's moments exist before the first save
    step_s = {a: [] for a in ARCHS}
    save_s = {a: [] for a in ARCHS}
    size = {}
    with tempfile.TemporaryDirectory(dir="data") as d:
        for _ in range(ROUNDS):
            for a in ARCHS:
                net, opt, sched = nets[a]
                step_s[a].append(steps(net, opt, sched, STEPS) / STEPS)
                run = {"epoch": 1, "best": 0.5, "best_epoch": 1, "history": [{"epoch": 1, "val_accuracy": 0.5}],
                       "seconds": 1.0, "best_state": {k: v.clone() for k, v in net.state_dict().items()}}
                path = Path(d) / "s.state"
                t = time.perf_counter()
                resume.save(path, {"arch": a}, net, opt, sched, torch.Generator().manual_seed(0), run)
                save_s[a].append(time.perf_counter() - t)
                size[a] = path.stat().st_size
    rows = {}
    for a in ARCHS:
        epoch = statistics.median(step_s[a]) * -(-ROWS // BATCH)
        save = statistics.median(save_s[a])
        rows[a] = {"parameters": models.count_parameters(nets[a][0]), "state_bytes": size[a],
                   "epoch_s_est": round(epoch, 3),
                   "save_s": round(save, 4), "save_share_of_epoch": round(save / epoch, 4),
                   "save_s_all": [round(s, 4) for s in save_s[a]]}
        print(f"{a:24s} {size[a] / 2**20:6.2f} MiB  epoch ~{epoch:8.2f} s  save {save * 1e3:7.1f} ms  "
              f"({100 * save / epoch:.2f}% of an epoch)")
    Path(out).write_text(json.dumps({"steps": STEPS, "rounds": ROUNDS, "batch": BATCH, "rows": ROWS,
                                     "threads": 1, "archs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
