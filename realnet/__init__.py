"""RealNet (CVPR 2024): the package shared by the five stage scripts.

Modules (each small, each read on its own), in the order the pipeline uses them:
    data         reading MVTec AD / MPDD / BTAD / VisA / plain folders
    adm          the class-conditional ADM UNet that SDAS samples from (stage 1, 2)
    diffusion    Gaussian diffusion with learned variance, SDAS and DDIM samplers (stage 1, 2)
    masks        where a synthetic anomaly goes: Perlin x foreground masks (stage 3, 4)
    textures     what a DTD anomaly looks like: the ten augmentations (stage 3, 4)
    synthesis    paper eq. 3: an anomaly source blended into an image under a mask (stage 3, 4)
    stream       the training stream: sample g as a pure function of (seed, g) (stage 3, 4)
    backbone     the frozen WideResNet50-2 (stage 3, 4, 5)
    features     image -> backbone -> AFS, the features RealNet reconstructs (stage 4, 5)
    ops          the fused RRS/AFS operators and their plain-PyTorch references
    model        reconstruction UNets, RRS, discriminator, loss (stage 4, 5)
    validation   checkpoint choice on held-out training images (stage 4)
    metrics      exact image/pixel AUROC and AU-PRO (stage 5)
    runs         run state: saved settings and their checks, RNG state, loss logs
    cli, files, progress, distributed, viz
                 what the stage scripts share: one-line errors and shared flags, atomic
                 files, progress lines, torchrun support, pictures

The exact semantics and every departure from the authors' code: docs/method.md. The
embedded demo data set is drawn by demo_data.py, outside this package.
"""

__version__ = "0.1.0"
