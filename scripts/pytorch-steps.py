#!/usr/bin/env python3
"""PyTorch anchor for `mekd bench-train`: the same three training steps with the same shapes, timed on
the CPU (default) or a GPU, so that a burn backend can be compared with PyTorch in one run. A copy of
`../shared/bench/pytorch_steps.py` (the script issue 20 names) plus `--profile`; `scripts/bench-train-vs-pytorch.sh`
alternates it with `mekd bench-train`.

  python3 scripts/pytorch-steps.py [--device cpu|cuda] [--threads N] [--warmup W] [--steps S] [--json FILE] [--profile]

Steps (as the reference MEKD code runs them, 1x32x32 images, 10 classes):
  teacher step   ResNet32 (CIFAR-style, 466,618 params), batch 128, SGD 0.1/0.9/5e-4, cross-entropy
  gan step       DCGAN deprivatization, batch 64: D step, then G step with the IM term on teacher argmax
  mekd step      ResNet32 teacher -> ResNet8 student (77,754 params), batch 128, frozen width-128
                 generator: L1 between G(student/5) and G(teacher/5) + KL(T=5) x 5, SGD on the student
Needs torch (PyPI). Prints one line per step and optionally writes JSON rows like bench-train's. With
--profile, each step's timed runs are followed by as many under torch.profiler, and its table of
operators by self CPU time (the 15 largest) is printed after the step's line.
"""
import argparse, json, statistics, time
import torch, torch.nn as nn, torch.nn.functional as F

class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False); self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False); self.b2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.short(x))

class ResNet(nn.Module):
    def __init__(self, blocks, classes=10, channels=1):
        super().__init__()
        self.c = nn.Conv2d(channels, 16, 3, 1, 1, bias=False); self.b = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks):
                layers.append(Block(cin, cout, stride if i == 0 else 1)); cin = cout
        self.layers = nn.Sequential(*layers); self.fc = nn.Linear(64, classes)
    def forward(self, x):
        x = self.layers(F.relu(self.b(self.c(x))))
        return self.fc(F.avg_pool2d(x, x.shape[-1]).flatten(1))

class Generator(nn.Module):
    def __init__(self, latent=10, channels=1, width=128):
        super().__init__()
        self.width = width; self.l1 = nn.Linear(latent, width * 8 * 8)
        self.net = nn.Sequential(
            nn.BatchNorm2d(width), nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, 1, 1),
            nn.BatchNorm2d(width, 0.8), nn.LeakyReLU(0.2, inplace=True), nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width // 2, 3, 1, 1), nn.BatchNorm2d(width // 2, 0.8), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width // 2, channels, 3, 1, 1), nn.Tanh())
    def forward(self, z):
        return self.net(self.l1(z).view(z.shape[0], self.width, 8, 8))

class Discriminator(nn.Module):
    def __init__(self, channels=1, width=16):
        super().__init__()
        layers, cin = [], channels
        for i, cout in enumerate((width, width * 2, width * 4, width * 8)):
            layers += [nn.Conv2d(cin, cout, 3, 2, 1), nn.LeakyReLU(0.2, inplace=True), nn.Dropout2d(0.25)]
            if i: layers.append(nn.BatchNorm2d(cout, 0.8))
            cin = cout
        self.net = nn.Sequential(*layers); self.fc = nn.Linear(cin * 4, 1)
    def forward(self, x):
        return torch.sigmoid(self.fc(self.net(x).flatten(1)))

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu"); ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=2); ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's operator table per step")
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    dev = torch.device(a.device); torch.manual_seed(0)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    teacher, student = ResNet(5).to(dev), ResNet(1).to(dev)
    G, D, Gf = Generator().to(dev), Discriminator().to(dev), Generator().to(dev).eval()
    for p in Gf.parameters(): p.requires_grad_(False)
    assert sum(p.numel() for p in teacher.parameters()) == 466618 and sum(p.numel() for p in student.parameters()) == 77754
    opt_t = torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_s = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_g = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999)); opt_d = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))
    x, y = torch.randn(128, 1, 32, 32, device=dev), torch.randint(0, 10, (128,), device=dev)
    real = torch.rand(64, 1, 32, 32, device=dev) * 2 - 1
    def teacher_step():
        teacher.train(); opt_t.zero_grad(); F.cross_entropy(teacher(x), y).backward(); opt_t.step()
    def gan_step():
        teacher.eval(); ones, zeros = torch.ones(64, 1, device=dev), torch.zeros(64, 1, device=dev)
        g = G(torch.randn(64, 10, device=dev))
        opt_d.zero_grad(); ((F.binary_cross_entropy(D(real), ones) + F.binary_cross_entropy(D(g.detach()), zeros)) / 2).backward(); opt_d.step()
        opt_g.zero_grad()
        with torch.no_grad(): idx = teacher(g).max(-1)[1].float()
        dg = D(g); (F.binary_cross_entropy(dg, ones) + 0.5 * torch.mean(-idx * torch.log(dg + 1e-5))).backward(); opt_g.step()
    def mekd_step():
        student.train(); teacher.eval()
        with torch.no_grad(): data = Gf(torch.randn(128, 10, device=dev)); t = teacher(data); tg = Gf(t / 5)
        opt_s.zero_grad(); s = student(data)
        loss = F.l1_loss(Gf(s / 5), tg) + F.kl_div(F.log_softmax(s / 5, -1), F.softmax(t / 5, -1), reduction="batchmean") * 5
        loss.backward(); opt_s.step()
    rows = []
    for name, fn, batch in (("teacher step (resnet32, b128)", teacher_step, 128), ("gan step (b64, resnet32 teacher)", gan_step, 64),
                            ("mekd step (resnet32 -> resnet8, b128)", mekd_step, 128)):
        for _ in range(a.warmup): fn()
        sync(); ts = []
        for _ in range(a.steps):
            t0 = time.perf_counter(); fn(); sync(); ts.append((time.perf_counter() - t0) * 1000)
        med = statistics.median(ts)
        rows.append({"step": name, "device": f"pytorch-{a.device}", "threads": torch.get_num_threads(), "batch": batch,
                     "steps": a.steps, "median_ms": med, "min_ms": min(ts), "max_ms": max(ts), "torch": torch.__version__})
        print(f"{name}: median {med:.1f} ms (min {min(ts):.1f}, max {max(ts):.1f}), torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
        if a.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(a.steps): fn(); sync()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    if a.json: json.dump(rows, open(a.json, "w"), indent=1)

if __name__ == "__main__":
    main()
