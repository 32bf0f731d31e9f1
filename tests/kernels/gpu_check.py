"""GPU check of the autotuned kernels at real shapes (not a pytest file: run on a CUDA machine).

    python tests/kernels/gpu_check.py

For each shape: correctness of lora_fwd / lora_bwd against torch in fp32 (relative norm error),
then median times (triton.testing.do_bench) of fastpeft vs. the base F.linear vs. the unfused
peft-style forward, all in one process on one device.
"""
import torch
import torch.nn.functional as F
import triton

from fastpeft.kernels.lora_bwd import lora_bwd
from fastpeft.kernels.lora_fwd import lora_fwd


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    dev, dt = "cuda", torch.bfloat16
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    for m, n, k, r, p in [(1, 4096, 4096, 16, 0.0), (16, 4096, 4096, 16, 0.0), (512, 4096, 4096, 64, 0.0),
                          (4096, 4096, 4096, 16, 0.1), (4096, 4096, 4096, 64, 0.0)]:
        torch.manual_seed(0)
        x = torch.randn(m, k, device=dev, dtype=dt)
        w = torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5
        a = torch.randn(r, k, device=dev) / k ** 0.5
        b = torch.randn(n, r, device=dev) / r ** 0.5
        bias = torch.randn(n, device=dev, dtype=dt)
        s = 2.0
        y, S = lora_fwd(x, w, bias, a, b, s, 0.0, 0)
        sr = x.float() @ a.T
        yr = x.float() @ w.float().T + s * sr @ b.T + bias.float()
        dy = torch.randn(m, n, device=dev, dtype=dt)
        dx, da, db = lora_bwd(dy, x, w, a, b, S, s, 0.0, 0)
        dsr = s * dy.float() @ b
        errs = dict(y=rel(y, yr), S=rel(S, sr), dx=rel(dx, dy.float() @ w.float() + dsr @ a),
                    da=rel(da, dsr.T @ x.float()), db=rel(db, s * dy.float().T @ sr))
        t_fast = triton.testing.do_bench(lambda: lora_fwd(x, w, bias, a, b, s, p, 1))
        t_base = triton.testing.do_bench(lambda: F.linear(x, w, bias))
        ab, bb = a, b

        def peft_like():
            xd = F.dropout(x.float(), p) if p else x.float()
            return F.linear(x, w, bias) + (F.linear(F.linear(xd, ab), bb) * s).to(dt)

        t_peft = triton.testing.do_bench(peft_like)
        t_bwd = triton.testing.do_bench(lambda: lora_bwd(dy, x, w, a, b, S, s, p, 1))
        t_bwd_base = triton.testing.do_bench(lambda: (dy @ w, dy.t() @ x))
        print(f"M={m} N={n} K={k} r={r} p={p} errs={ {k_: f'{v:.1e}' for k_, v in errs.items()} } "
              f"fwd: fastpeft {t_fast*1e3:.1f}us base {t_base*1e3:.1f}us peft-like {t_peft*1e3:.1f}us | "
              f"bwd: fastpeft {t_bwd*1e3:.1f}us base dX+dW {t_bwd_base*1e3:.1f}us")


if __name__ == "__main__":
    main()
