"""How strong DMD2's discriminator is in a flow DMD run, and how hard its GAN term pushes the generator.

    python tools/flow_gan_probe.py runs/trial-dmd4-gan05/checkpoint

Reads (with the run's own :func:`cdlab.flow.student_checkpoint.load_checkpoint`) a checkpoint of ``python -m cdlab.flow.distill --method dmd --gan-weight ...`` (its last step), draws one
batch of 64 generator samples (classes i mod 10, seed 1) and 64 real training images of the same classes, diffuses
both to the DMD matching's t with the same noise, and prints:

* the norm of the distribution-matching gradient on the samples (``grad / numel``, what ``loss_dm`` puts on
  ``x_g``) beside the GAN term's at weight 1 (``d mean softplus(-D) / d x_g``): multiply the second by the run's
  ``--gan-weight`` to compare them;
* the discriminator's accuracy (real logits > 0, generated < 0), over all t and split at timestep 500 (a
  discriminator of its own, ``--disc pixel``, judges the clean images: its accuracy alone).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdlab.flow import distill, matching  # noqa: E402
from cdlab.flow.data import images_of_classes, load_fashion_mnist  # noqa: E402
from cdlab.flow.model import FLOW_SCHEDULE, FlowModel  # noqa: E402
from cdlab.flow.student_checkpoint import CHECKPOINT_JSON, load_checkpoint  # noqa: E402
from cdlab.loss import discriminate, dmd_generator_loss  # noqa: E402
from cdlab.paths import read_json  # noqa: E402
from cdlab.samplers import consistency_timesteps  # noqa: E402
from cdlab.students.roles import FAKE_SCORE  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/flow_gan_probe.py", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a DMD run's checkpoint folder (with --gan-weight > 0)")
    p.add_argument("--teacher", default=None, help="the run's teacher folder (default: the one it names)")
    p.add_argument("--sample-steps", type=int, default=None, help="the generator's steps (default: the run's)")
    args = p.parse_args(argv)
    folder = Path(args.checkpoint)
    saved = read_json(folder / CHECKPOINT_JSON) or p.error(f"{folder}: no {CHECKPOINT_JSON}")
    cfg = distill.StudentConfig(**{**saved["config"], "steps": saved["step"]})
    if cfg.gan_weight <= 0:
        p.error(f"{folder}: a run without the GAN term (--gan-weight 0) has no discriminator to probe")
    teacher = args.teacher or saved["teacher"]
    unet = distill.attach_flow_lora(distill._load_teacher_unet(teacher, torch.device("cpu")), cfg.lora_rank)
    distill.attach_flow_lora(unet, cfg.lora_rank, adapter_name=FAKE_SCORE)
    head = distill.make_discriminator(unet, cfg)  # DMD2's head, or a discriminator of its own (--disc pixel)
    opt, ema, average = distill._optimizer_and_averages(
        [(n, q) for n, q in unet.named_parameters() if q.requires_grad], cfg, head)
    load_checkpoint(folder, unet, opt, ema, torch.Generator(), cfg=cfg, teacher=teacher, init=saved["init"],
                    average=average, head=head)  # the run's own reader: its recipe checked, every part restored
    unet.eval()
    g = torch.Generator().manual_seed(1)
    y = torch.arange(64) % matching.NUM_CLASSES
    c = matching.one_hot(y)
    k = args.sample_steps or cfg.sample_steps
    out = dmd_generator_loss(unet, c, FLOW_SCHEDULE, uncond=torch.zeros_like(c[:1]), guidance=cfg.guidance,
                             generator_adapter=distill.ADAPTER, fake_adapter=FAKE_SCORE,
                             gen_timesteps=consistency_timesteps(k, k), latent_shape=(1, 28, 28), generator=g,
                             model_class=FlowModel)
    x_g, t = out["x_g"].clone().requires_grad_(True), out["t"]
    n = torch.randn(x_g.shape, generator=g)
    gan, kw = distill.gan_argument(unet, head), dict(fake_adapter=FAKE_SCORE, model_class=FlowModel)
    own = cfg.disc != "head"  # a discriminator of its own judges the clean images (t plays no part)

    def logits(x: torch.Tensor) -> torch.Tensor:
        return discriminate(unet, gan, x, t, n, c, FLOW_SCHEDULE, **kw)[0]

    head.eval()  # a pixel discriminator's spectral norm holds still: the probe changes nothing it reads
    fake = logits(x_g)
    torch.nn.functional.softplus(-fake).mean().backward()
    real = images_of_classes(*load_fashion_mnist("train"), y, g)
    with torch.no_grad():
        real_logits = logits(real)

    def acc(m: torch.Tensor) -> float:
        return float(((fake.detach()[m] < 0).float().mean() + (real_logits[m] > 0).float().mean()) / 2)

    print(f"step {saved['step']}: matching gradient norm {float((out['grad'] / x_g.numel()).norm()):.3e}, "
          f"GAN gradient norm at weight 1 {float(x_g.grad.norm()):.3e}")
    split = "on the clean images" if own else f"timestep >= 500: {acc(t >= 500):.3f}, below: {acc(t < 500):.3f}"
    print(f"discriminator accuracy {acc(t >= 0):.3f} ({split})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
