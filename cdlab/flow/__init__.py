"""Flow matching from scratch (seed 003, part B, "Project 5B: Flow Matching from Scratch") on Fashion-MNIST.

======================================  ================================================================================
:mod:`cdlab.flow.data`                  the idx files of Fashion-MNIST (or MNIST), pixels in ``[0, 1]``
:mod:`cdlab.flow.unet`                  the seed's UNet (§1.1), with t (§2.1) and a one-hot class c (§2.4)
:mod:`cdlab.flow.denoiser`              the one-step denoiser (§1.2): noising, its L2 loss, the pure-noise case
:mod:`cdlab.flow.matching`              the flow-matching loss (§2.2), class dropout, CFG and the Euler sampler
:mod:`cdlab.flow.model`                 :class:`FlowModel`: the flow UNet as the lab's eps model (its samplers, losses)
:mod:`cdlab.flow.train_teacher`         ``python -m cdlab.flow.train_teacher``: a time-budgeted, resumable teacher run whose
                                        folder the app's Train tab reads (status, ``metrics.jsonl``, class grids)
:mod:`cdlab.flow.classifier`            the judge: a CNN on the real training set, its 128-d features for FID
:mod:`cdlab.flow.pairs`                 the teacher's own samples from fixed noise (reflow's coupling, DMD's regression), cached
:mod:`cdlab.flow.distill`               few-step students as LoRAs: CD / multi-boundary CD on the flow ODE, 2-rectified flow,
                                        piecewise rectified flow (PeRFlow) and DMD
:mod:`cdlab.flow.student_run`           a student run's folder for the Train tab (``--run-dir``)
:mod:`cdlab.flow.student_checkpoint`    a student run's checkpoint: the LoRA, its averages, Adam, the recipe
:mod:`cdlab.flow.evaluate`              ``python -m cdlab.flow.evaluate``: FID, class accuracy and diversity at 1/2/4/8 steps
======================================  ================================================================================
"""
