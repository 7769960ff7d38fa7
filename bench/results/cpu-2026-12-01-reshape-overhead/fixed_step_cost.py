import sys, time, statistics, torch
sys.path.insert(0, sys.argv[1])  # a checkout with its extension built in place
import fastopt
torch.set_num_threads(1)
out = []
for name, kw in [("Adam", {"lr": 1e-3}), ("SGD", {"lr": 1e-3, "momentum": 0.9}), ("RMSprop", {"lr": 1e-3}), ("Adagrad", {"lr": 1e-2})]:
    ps = [torch.randn(1, requires_grad=True) for _ in range(100)]
    for p in ps: p.grad = torch.randn_like(p)
    opt = getattr(fastopt, name)(ps, **kw)
    for _ in range(200): opt.step()
    ts = []
    for _ in range(15):
        t = time.perf_counter()
        for _ in range(200): opt.step()
        ts.append((time.perf_counter() - t) / 200 * 1e6)
    out.append(f"{name}={min(ts):.0f}")
print(sys.argv[1].split('/')[-1], " ".join(out))
