"""fastpeft packaging.

The Triton kernels live in the top-level folder `kernels/` and install as the subpackage
`fastpeft.kernels`. The CUDA C++ kernels in `csrc/` are built just in time on a CUDA
machine (see fastpeft/ops/cuda_backend.py); set FASTPEFT_BUILD_CUDA=1 to build them ahead
of time here instead (needs torch with CUDA and nvcc in the build environment, so use
`pip install --no-build-isolation`).
"""
import os

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
if os.environ.get("FASTPEFT_BUILD_CUDA") == "1":
    # Same sources and flags as the just-in-time build in fastpeft/ops/cuda_backend.py (CSRC_FILES,
    # nvcc_flags); listed here so setup.py never imports the package. GPU targets come from
    # TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0a") as usual for torch extensions.
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext_modules = [
        CUDAExtension(
            "fastpeft._C",
            ["csrc/binding.cpp", "csrc/lora_gemv.cu", "csrc/lora_qgemv.cu"],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++17"]},
        )
    ]
    cmdclass = {"build_ext": BuildExtension}

setup(
    name="fastpeft",
    version="0.1.0",
    description="peft-compatible parameter-efficient fine-tuning on fused Triton and CUDA kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # kernels/ installs as fastpeft.kernels; csrc/ ships as fastpeft/csrc (sources for the just-in-time build)
    packages=find_packages(include=["fastpeft", "fastpeft.*"]) + ["fastpeft.kernels", "fastpeft.csrc"],
    package_dir={"fastpeft.kernels": "kernels", "fastpeft.csrc": "csrc"},
    package_data={"fastpeft.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "safetensors",
        "huggingface_hub",
        "tqdm",
        "packaging",
        "triton>=3.6; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "peft==0.21.2", "transformers==5.24.0", "bitsandbytes", "accelerate==1.15.0",
                 "matplotlib", "trl==1.16.0", "deepspeed==0.19.8", "compressed-tensors==0.20.1"],
    },
    entry_points={"console_scripts": ["fastpeft=fastpeft.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
