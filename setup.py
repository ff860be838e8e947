"""Builds the `realnet` package and its extension `realnet._C` (csrc/).

    pip install --no-build-isolation -e .

--no-build-isolation: build against the torch that is installed (pip would otherwise
download another torch into an isolated build environment).

The CPU kernels are always built. The CUDA kernels are added whenever nvcc and a CUDA
build of torch are present (no GPU is needed to compile them). Environment switches:
    USE_CUDA=0                   CPU only
    TORCH_CUDA_ARCH_LIST="9.0"   GPU architectures; defaults to the visible GPUs, or to
                                 9.0 (H100/H200) when none is visible, instead of every one
    CUDA_HOME=/usr/local/cuda    where the toolkit is (found automatically if standard)
    DEBUG=1                      -O0 -g
"""

import os
import shutil

from setuptools import find_packages, setup

# torch looks for the toolkit next to `nvcc` on PATH; a wrapper script in /usr/local/bin
# would make it look in /usr/local. Point it at the real toolkit first.
if "CUDA_HOME" not in os.environ and os.path.isfile("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

debug = os.environ.get("DEBUG", "0") == "1"
want_cuda = os.environ.get("USE_CUDA", "1") != "0"
has_nvcc = CUDA_HOME is not None and (
    os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc")
)
use_cuda = want_cuda and torch.version.cuda is not None and bool(has_nvcc)

if use_cuda and "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    print(
        "realnet: no GPU visible, compiling the CUDA kernels for "
        "TORCH_CUDA_ARCH_LIST=9.0 (H100/H200)"
    )

opt = ["-O0", "-g"] if debug else ["-O3"]
sources = ["csrc/realnet.cpp", "csrc/cpu/realnet_cpu.cpp"]
extra_compile_args = {"cxx": opt + ["-fopenmp"]}
if use_cuda:
    # the registrations, and every version of the kernels (csrc/cuda/versions.h)
    sources += ["csrc/cuda/realnet_cuda.cu", "csrc/cuda/v1.cu", "csrc/cuda/v2.cu"]
    extra_compile_args["nvcc"] = opt + ["-lineinfo"]
    Extension = CUDAExtension
else:
    Extension = CppExtension
print(f"realnet: building the extension with {'CPU and CUDA' if use_cuda else 'CPU'} kernels")

setup(
    name="realnet",
    version="0.1.0",
    description="RealNet (CVPR 2024) reference implementation with fused RRS/AFS operators",
    packages=find_packages(include=["realnet", "realnet.*"]),
    ext_modules=[
        Extension(
            "realnet._C",
            sources,
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
)
