"""Pilot of student recipes with ONLINE distillation (teacher run on the very batch the student sees):
the upper bound of a views cache with K -> infinity. Standalone; pipeline code only for loading."""
import sys, time, json, math, argparse
sys.path.insert(0, '/work/wt-20')
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from pipeline import models
from pipeline.formats.checkpoint import read_checkpoint
from pipeline.formats.prepared import open_prepared
from pipeline.jitter import jitter
from pipeline import augment
p = argparse.ArgumentParser()
p.add_argument("--arch", required=True); p.add_argument("--epochs", type=int, default=20)
p.add_argument("--alpha", type=float, default=0.9); p.add_argument("--T", type=float, default=4)
p.add_argument("--lr", type=float, default=3e-3); p.add_argument("--wd", type=float, default=5e-4)
p.add_argument("--opt", default="adamw"); p.add_argument("--shift", type=int, default=2); p.add_argument("--flip", type=float, default=0.5)
p.add_argument("--erase", type=float, default=0.0); p.add_argument("--teachers", default="")
p.add_argument("--seed", type=int, default=0); p.add_argument("--bs", type=int, default=128); p.add_argument("--ls", type=float, default=0.0)
a = p.parse_args()
torch.set_num_threads(1); torch.manual_seed(a.seed); g = torch.Generator().manual_seed(a.seed)
info = open_prepared('/work/runs/data/prepared/fashion-mnist.h5')
xtr, ytr = map(torch.from_numpy, info.load('train')); xva, yva = map(torch.from_numpy, info.load('val')); xte, yte = map(torch.from_numpy, info.load('test'))
fill = float(info.black()[0]); lo, hi = xtr.min(), xtr.max()
teachers = [models.from_checkpoint(read_checkpoint(t, 'teacher-member')).to(memory_format=torch.channels_last).eval() for t in a.teachers.split(',') if t]
net = models.build(a.arch, (1, 28, 28), 10).to(memory_format=torch.channels_last)
nparam = models.count_parameters(net)
if a.opt == 'sgd':
    opt = torch.optim.SGD([{"params": [q for q in net.parameters() if q.ndim > 1], "weight_decay": a.wd}, {"params": [q for q in net.parameters() if q.ndim <= 1], "weight_decay": 0}], lr=a.lr, momentum=0.9, nesterov=True)
else:
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=a.wd)
spe = math.ceil(len(xtr) / a.bs)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.epochs * spe, pct_start=0.15)
@torch.no_grad()
def teach(x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return torch.stack([t(x).float() for t in teachers]).softmax(-1) if False else torch.stack([t(x).float() for t in teachers])
@torch.no_grad()
def acc(X, Y):
    net.eval(); z = torch.cat([net(X[i:i+2000].contiguous(memory_format=torch.channels_last)) for i in range(0, len(X), 2000)])
    return float((z.argmax(-1) == Y).float().mean())
t0 = time.time(); best = (0, 0, None)
for ep in range(a.epochs):
    net.train(); order = torch.randperm(len(xtr), generator=g)
    for i in range(0, len(xtr), a.bs):
        idx = order[i:i + a.bs]
        x = augment.erase(augment.hflip(jitter(xtr[idx], a.shift, g, fill), a.flip, g), a.erase, g, lo, hi).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = net(x).float()
        loss = (1 - a.alpha) * F.cross_entropy(z, ytr[idx], label_smoothing=a.ls)
        if a.alpha > 0:
            v = teach(x)  # [M, B, C]
            pt = (v / a.T).softmax(-1).mean(0)
            loss = loss + a.alpha * a.T ** 2 * F.kl_div(F.log_softmax(z / a.T, -1), pt, reduction='batchmean')
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); sched.step()
    va = acc(xva, yva)
    if va >= best[0]: best = (va, ep + 1, {k: v.clone() for k, v in net.state_dict().items()})
    print(f"{a.arch} ep {ep+1} val {va:.4f} t {time.time()-t0:.0f}s", flush=True)
last = acc(xte, yte); net.load_state_dict(best[2]); te = acc(xte, yte)
print(json.dumps(dict(vars(a), params=nparam, best_val=best[0], best_epoch=best[1], test=te, test_last=last, minutes=(time.time() - t0) / 60)), flush=True)
