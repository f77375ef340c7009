import sys, json; sys.path.insert(0, '/work/wt-20')
import torch, numpy as np
from pipeline import models
from pipeline.formats.checkpoint import read_checkpoint
from pipeline.formats.prepared import open_prepared
torch.set_num_threads(1)
info = open_prepared('/work/runs/data/prepared/fashion-mnist.h5')
paths = sys.argv[1:]
out = {}
for split in ("val", "test"):
    x, y = map(torch.from_numpy, info.load(split))
    Z, Zf = [], []
    for p in paths:
        net = models.from_checkpoint(read_checkpoint(p, 'teacher-member')).eval()
        Z.append(models.predict(net, x)); Zf.append(models.predict(net, x.flip(-1)))
    Z, Zf = torch.stack(Z), torch.stack(Zf)   # [M, N, C]
    acc = lambda z: float((z.argmax(-1) == y).float().mean())
    nll = lambda pr: float(-torch.log(pr[torch.arange(len(y)), y].clamp_min(1e-12)).mean())
    r = {}
    for i in range(len(paths)):
        r[f"member{i}"] = acc(Z[i]); r[f"member{i}_tta"] = acc((Z[i] + Zf[i]) / 2)
    pe = Z.softmax(-1).mean(0); pet = ((Z + Zf) / 2).softmax(-1).mean(0)
    r["ensemble"] = acc(pe); r["ensemble_tta_logitmean"] = acc(pet)
    r["ensemble_nll"] = nll(pe); r["ensemble_tta_nll"] = nll(pet)
    out[split] = r
print(json.dumps(out, indent=1))
