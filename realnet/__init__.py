"""RealNet (CVPR 2024): the package shared by the five stage scripts.

Modules (each small, each read on its own), in the order the pipeline uses them:
    data         reading MVTec AD / MPDD / BTAD / VisA / plain folders
    demo_data    the embedded default data set, drawn procedurally from a seed
    adm          the class-conditional ADM UNet that SDAS samples from (stage 1, 2)
    diffusion    Gaussian diffusion with learned variance, SDAS and DDIM samplers (stage 1, 2)
    anomaly      synthetic anomalies: Perlin masks, foregrounds, blending (stage 3, 4)
    backbone     the frozen WideResNet50-2 feature extractor (stage 3, 4, 5)
    ops          the fused RRS/AFS operators and their plain-PyTorch references
    model        reconstruction UNets, RRS, discriminator, loss (stage 4, 5)
    metrics      exact image/pixel AUROC and AU-PRO (stage 5)
    cli, files, progress, distributed, viz
                 what the stage scripts share: one-line errors, atomic files,
                 progress lines, torchrun support, pictures
"""
__version__ = "0.1.0"
