"""RealNet (CVPR 2024): the package shared by the five stage scripts.

Modules (each small, each read on its own):
    ops          the fused RRS/AFS operators and their plain-PyTorch references
    cli, files, progress, distributed, viz
                 what the stage scripts share: one-line errors, atomic files,
                 progress lines, torchrun support, pictures
"""
__version__ = "0.1.0"
