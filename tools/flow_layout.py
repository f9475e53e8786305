"""The flow teacher's UNet in channels-last order against the default layout, in one run (docs/performance.md).

    python tools/flow_layout.py          # torch's default threads (2 on this project's machine)

Times a sampling pass (inference mode) at the batches the app meets (2: one Compare with CFG; 60: thirty at
once; 256: an evaluation's), the same at 60 with a student's LoRA attached after the layout (unfused), and an
Adam training step (64: a student's batch; 128: the teacher's): each layout on the same inputs, one after the
other, the median of its calls (`cdlab.bench.timeit`); prints each ratio and the largest difference of the two
layouts' outputs.
The lab loads and trains the UNet channels-last (`cdlab.flow.unet.channels_last`).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdlab.bench import timeit  # noqa: E402
from cdlab.flow.pipeline import load_flow_teacher  # noqa: E402


def milliseconds(f, repeats: int = 10) -> float:
    """The median of ``repeats`` timed calls after one warm-up (`cdlab.bench.timeit`), in milliseconds."""
    return timeit(f, "cpu", repeats=repeats) * 1000


def main() -> int:
    unet = load_flow_teacher().pipe.unet                                    # loaded channels-last
    plain = copy.deepcopy(unet).to(memory_format=torch.contiguous_format)   # the default layout
    print(f"torch threads {torch.get_num_threads()}")
    for b in (2, 60, 256):
        x, t, c = torch.randn(b, 1, 28, 28), torch.rand(b), torch.eye(10)[torch.arange(b) % 10]
        with torch.inference_mode():
            a, cl = milliseconds(lambda: plain(x, t, c)), milliseconds(lambda: unet(x, t, c))
            diff = (plain(x, t, c) - unet(x, t, c)).abs().max().item()
        print(f"sampling, batch {b}: default {a:.1f} ms, channels-last {cl:.1f} ms, {a / cl:.2f}x "
              f"(outputs within {diff:.1e})")
    from cdlab.flow.distill import attach_flow_lora

    lora_plain, lora_cl = (attach_flow_lora(copy.deepcopy(m), 32) for m in (plain, unet))  # a student, unfused
    x, t, c = torch.randn(60, 1, 28, 28), torch.rand(60), torch.eye(10)[torch.arange(60) % 10]
    with torch.inference_mode():
        a, cl = milliseconds(lambda: lora_plain(x, t, c)), milliseconds(lambda: lora_cl(x, t, c))
    print(f"sampling with a rank-32 LoRA (unfused), batch 60: default {a:.1f} ms, channels-last {cl:.1f} ms, "
          f"{a / cl:.2f}x")
    for b in (64, 128):
        x, t, c = torch.randn(b, 1, 28, 28), torch.rand(b), torch.eye(10)[torch.arange(b) % 10]
        times = []
        for m in (copy.deepcopy(plain), copy.deepcopy(unet)):
            m.train().requires_grad_(True)
            opt = torch.optim.Adam(m.parameters(), 1e-4)

            def step(m=m, opt=opt):
                opt.zero_grad()
                (m(x, t, c) - x).pow(2).mean().backward()
                opt.step()
            times.append(milliseconds(step, 5))
        print(f"training step, batch {b}: default {times[0]:.0f} ms, channels-last {times[1]:.0f} ms, "
              f"{times[0] / times[1]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
