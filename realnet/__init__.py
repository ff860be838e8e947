"""RealNet (CVPR 2024): the package shared by the five stage scripts.

Modules (each small, each read on its own), in the order the pipeline uses them:
    data         reading MVTec AD / MPDD / BTAD / VisA / plain folders
    adm          the class-conditional ADM UNet that SDAS samples from (stage 1, 2)
    diffusion    Gaussian diffusion with learned variance, SDAS and DDIM samplers (stage 1, 2)
    masks        where a synthetic anomaly goes: Perlin x foreground masks (stage 3, 4)
    textures     what a DTD anomaly looks like: the ten augmentations (stage 3, 4)
    anomalies    paper eq. 3: an anomaly source blended into an image under a mask (stage 3, 4)
    stream       the training stream: sample g as a pure function of (seed, g) (stage 3, 4)
    visibility   does the backbone see an anomaly source at all? (stage 3, beyond the paper)
    backbone     the frozen WideResNet50-2 (stage 3, 4, 5)
    features     image -> backbone -> AFS, the features RealNet reconstructs (stage 4, 5)
    afs_file     stage 3's output file and the defaults stage 4 takes from it
    ops          the fused RRS/AFS operators and their plain-PyTorch references
    model        reconstruction UNets, RRS, discriminator, loss (stage 4, 5)
    checkpoint   model.pt / best.pt: what is saved, resumed and loaded (stage 4, 5)
    validation   checkpoint choice on held-out training images (stage 4)
    calibration  the fused map's scale and the OK/NG thresholds, on good images (stage 4, 5)
    metrics      exact image/pixel AUROC and AU-PRO (stage 5)
    inference    a checkpoint loaded for scoring; anomaly maps of a data set (stage 5)
    predict      --predict: a production lot scored and written as a stream (stage 5)
    export       --export: the whole model as one torch.export program (stage 5)
    throughput   forward-pass images/s (stage 5, benchmarks)
    panels       evaluate.py's pictures: heatmap panels, curves
    runs         run state: saved settings and their checks, RNG state, loss logs
    cli, files, progress, precision, loaders, distributed, viz
                 what the stage scripts share: one-line errors and shared flags, atomic
                 files and locked folders, progress lines, fp32/bf16/fp16, DataLoaders,
                 torchrun support, pictures

The exact semantics and every departure from the authors' code: docs/method.md. The
embedded demo data set is drawn by demo_data.py, outside this package.
"""

__version__ = "0.1.0"
