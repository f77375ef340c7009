"""Pilot of the strong-teacher recipe (standalone; not the pipeline)."""
import gzip, time, sys, json, math, argparse
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
p = argparse.ArgumentParser()
p.add_argument("--arch", default="res20"); p.add_argument("--epochs", type=int, default=15)
p.add_argument("--lr", type=float, default=0.1); p.add_argument("--wd", type=float, default=5e-4)
p.add_argument("--ls", type=float, default=0.1); p.add_argument("--erase", type=float, default=0.5)
p.add_argument("--flip", type=float, default=0.5); p.add_argument("--shift", type=int, default=2)
p.add_argument("--seed", type=int, default=0); p.add_argument("--bs", type=int, default=128)
p.add_argument("--threads", type=int, default=1); p.add_argument("--out", default=None)
a = p.parse_args()
torch.set_num_threads(a.threads); torch.manual_seed(a.seed)
D = "/usr/share/datasets/fashion-mnist/"
def load(n):
    img = np.frombuffer(gzip.open(D + f"{n}-images-idx3-ubyte.gz").read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    lab = np.frombuffer(gzip.open(D + f"{n}-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    return img, lab.astype(np.int64)
xtr, ytr = load("train"); xte, yte = load("t10k")
xtr, ytr, xva, yva = xtr[:55000], ytr[:55000], xtr[55000:], ytr[55000:]
mean, std = xtr.mean() / 255, xtr.std() / 255
norm = lambda x: torch.from_numpy(((x / 255.0 - mean) / std).astype(np.float32))
Xtr, Xva, Xte = norm(xtr), norm(xva), norm(xte); Ytr = torch.from_numpy(ytr)
black = float((0 - mean) / std)
def cbr(i, o, s=1): return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
class Basic(nn.Module):
    def __init__(s, i, o, st):
        super().__init__(); s.c1 = nn.Conv2d(i, o, 3, st, 1, bias=False); s.b1 = nn.BatchNorm2d(o)
        s.c2 = nn.Conv2d(o, o, 3, 1, 1, bias=False); s.b2 = nn.BatchNorm2d(o)
        s.sc = nn.Sequential() if (i == o and st == 1) else nn.Sequential(nn.Conv2d(i, o, 1, st, bias=False), nn.BatchNorm2d(o))
    def forward(s, x): return F.relu(s.b2(s.c2(F.relu(s.b1(s.c1(x))))) + s.sc(x))
def resnet(w, n):
    L = cbr(1, w[0]); last = w[0]
    for j, (c, k) in enumerate(zip(w, n)):
        for b in range(k): L.append(Basic(last, c, 2 if (b == 0 and j > 0) else 1)); last = c
    return nn.Sequential(*L, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, 10))
def vgg(w):
    a_, b_, c_ = w
    return nn.Sequential(*cbr(1, a_), *cbr(a_, a_), nn.MaxPool2d(2), *cbr(a_, b_), *cbr(b_, b_), nn.MaxPool2d(2),
                         *cbr(b_, c_), *cbr(c_, c_), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_, 10))
ARCH = {"res20": lambda: resnet((16, 32, 64), (3, 3, 3)), "res14w": lambda: resnet((32, 64, 128), (2, 2, 2)),
        "res8w": lambda: resnet((32, 64, 128), (1, 1, 1)), "vgg32": lambda: vgg((32, 64, 128)),
        "vgg48": lambda: vgg((48, 96, 192)), "res20w": lambda: resnet((24, 48, 96), (3, 3, 3))}
net = ARCH[a.arch]().to(memory_format=torch.channels_last)
nparam = sum(p.numel() for p in net.parameters())
decay = [p for n_, p in net.named_parameters() if p.ndim > 1]; nodecay = [p for n_, p in net.named_parameters() if p.ndim <= 1]
opt = torch.optim.SGD([{"params": decay, "weight_decay": a.wd}, {"params": nodecay, "weight_decay": 0}], lr=a.lr, momentum=0.9, nesterov=True)
spe = math.ceil(55000 / a.bs); steps = a.epochs * spe
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=steps, pct_start=0.15, div_factor=25, final_div_factor=1e3)
g = torch.Generator().manual_seed(a.seed)
def augment(x):
    b = x.shape[0]
    if a.shift:
        s = a.shift; pad = F.pad(x, (s, s, s, s), value=black)
        off = torch.randint(0, 2 * s + 1, (2, b), generator=g)
        rows = (torch.arange(28)[None] + off[0][:, None])[:, :, None]; cols = (torch.arange(28)[None] + off[1][:, None])[:, None, :]
        x = pad[torch.arange(b)[:, None, None], 0, rows, cols][:, None]
    if a.flip:
        f = torch.rand(b, generator=g) < a.flip; x = torch.where(f[:, None, None, None], x.flip(-1), x)
    if a.erase:
        x = x.clone()
        do = torch.rand(b, generator=g) < a.erase
        area = 784 * (0.02 + 0.38 * torch.rand(b, generator=g)); logr = math.log(0.3) + (math.log(1/0.3) - math.log(0.3)) * torch.rand(b, generator=g)
        r = torch.exp(logr); h = (area * r).sqrt().round().clamp(1, 28).long(); w = (area / r).sqrt().round().clamp(1, 28).long()
        y0 = (torch.rand(b, generator=g) * (29 - h)).long(); x0 = (torch.rand(b, generator=g) * (29 - w)).long()
        ii = torch.arange(28)
        m = do[:, None, None] & (ii[None, :, None] >= y0[:, None, None]) & (ii[None, :, None] < (y0 + h)[:, None, None]) \
            & (ii[None, None, :] >= x0[:, None, None]) & (ii[None, None, :] < (x0 + w)[:, None, None])
        noise = torch.randn(x.shape, generator=g)
        x = torch.where(m[:, None], noise, x)
    return x.contiguous(memory_format=torch.channels_last)
@torch.no_grad()
def predict(X, tta=False):
    net.eval(); out = []
    for i in range(0, len(X), 1000):
        xb = X[i:i+1000].contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = net(xb).float()
            if tta: z = (z.softmax(-1) + net(xb.flip(-1)).float().softmax(-1))
        out.append(z)
    return torch.cat(out)
t0 = time.time(); log = []
for ep in range(a.epochs):
    net.train(); order = torch.randperm(55000, generator=g); tl = 0
    for i in range(0, 55000, a.bs):
        idx = order[i:i+a.bs]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(augment(Xtr[idx])).float(), Ytr[idx], label_smoothing=a.ls)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); sched.step(); tl += float(loss)
    va = float((predict(Xva).argmax(-1) == torch.from_numpy(yva)).float().mean())
    print(f"{a.arch} ep {ep+1} loss {tl/spe:.4f} val {va:.4f} t {time.time()-t0:.0f}s", flush=True)
zt = predict(Xte); ztt = predict(Xte, tta=True)
te = float((zt.argmax(-1) == torch.from_numpy(yte)).float().mean()); tet = float((ztt.argmax(-1) == torch.from_numpy(yte)).float().mean())
res = dict(vars(a), params=nparam, val=va, test=te, test_tta=tet, minutes=(time.time()-t0)/60)
print(json.dumps(res), flush=True)
if a.out: np.save(a.out, zt.numpy()); np.save(a.out.replace('.npy','-tta.npy'), ztt.numpy())
