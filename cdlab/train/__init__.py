"""Consistency-distillation training (CT, CD, multi-boundary CD) of LoRA students.

    python -m cdlab train --model tiny                         # tiny teacher, multi-boundary CD, N = 4
    python -m cdlab train --model tiny --method cd --num_boundaries 1 --student_name tiny-cd-4
    python -m cdlab train --model tiny --method ct --student_name tiny-ct-4
    python -m cdlab coco --images val2017 --captions annotations/captions_val2017.json --out data/coco5k --n 5000
    python -m cdlab train --model sd15 --data data/coco5k      # the course's final project
    python -m cdlab train --resume runs/<run_name>
    torchrun --nproc_per_node 2 -m cdlab train --model tiny    # data parallel; same entry point

The latent cache's effect, measured with the trainer's own samples/s (metrics.jsonl)::

    python -m cdlab train --model tiny --data_size 2048 --max_steps 30 --log_every 10 --cache_latents true  --run_name speed-cached
    python -m cdlab train --model tiny --data_size 2048 --max_steps 30 --log_every 10 --cache_latents false --run_name speed-uncached

Modules: `config` (the flat `TrainConfig` and per-teacher defaults), `data` (sources and the latent
cache), `trainer` (`train`, `Trainer`), `schedule` (the rate's warm-up and cosine, the flow students' too), `cli`
(``main(argv)``), `coco` (the COCO recipe).
The loss itself is `cdlab.loss.consistency_loss`.
"""
from __future__ import annotations

from typing import Any

__all__ = ["TrainConfig", "train", "Trainer", "TrainResult"]


def __getattr__(name: str) -> Any:  # lazy: importing cdlab.train must not import torch/diffusers
    if name == "TrainConfig":
        from cdlab.train.config import TrainConfig

        return TrainConfig
    if name in ("train", "Trainer", "TrainResult"):
        from cdlab.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'cdlab.train' has no attribute {name!r}")
