"""megatrain: GPT-3-style pretraining on DeepSpeed.

Install with `make install` (torch first, then this package with
--no-build-isolation, so pip never builds against a CUDA torch it downloads).

Builds megatrain._fused_adamw, the fused AdamW + global-norm clipping op (csrc/): the
CPU kernel always, the CUDA kernel too when the installed torch has CUDA and nvcc is
found (MEGATRAIN_CPU_ONLY=1 skips it).
"""

import importlib.util
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# The architectures (SASS for each, PTX for the newest), from the package's own file, by path:
# megatrain is not importable yet.
_spec = importlib.util.spec_from_file_location(
    "cuda_arches",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "megatrain", "optim", "cuda_arches.py"),
)
cuda_arches = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cuda_arches)


def fused_adamw_extension():
    # -fno-math-errno: without it sqrtf keeps a branch to libm (for errno) and the update loop
    # does not vectorise. Nothing here reads errno.
    cxx = ["-O3", "-fno-math-errno", "-fopenmp", "-std=c++17"]
    cpu_sources = ["csrc/fused_adamw_cpu.cpp"]
    if torch.version.cuda and CUDA_HOME and not os.environ.get("MEGATRAIN_CPU_ONLY"):
        nvcc = ["-O3", "-std=c++17", *cuda_arches.gencode_flags(cuda_arches.arches())]
        return CUDAExtension(
            "megatrain._fused_adamw",
            cpu_sources + ["csrc/fused_adamw_cuda_binding.cpp", "csrc/fused_adamw_cuda.cu"],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "megatrain._fused_adamw", cpu_sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"]
    )


install_requires = [
    # Pinned: an unpinned torch pulls a multi-GB CUDA build (make install puts the
    # CPU or CUDA build of 2.13.0 in place first).
    "torch==2.13.0",
    "deepspeed==0.19.8",
    "sentencepiece==0.2.3",
    "pyarrow==26.0.1",  # token shards: Arrow IPC, memory-mapped
    "wandb==0.31.0",  # optional logging, offline by default
    "numpy==2.4.6",
    "pyyaml==6.0.4",  # run configs
    "tqdm==4.70.1",  # progress bars for long work
    # the planner's memory on a CPU accelerator (available RAM); the supervisor finds the
    # ranks it signals; DeepSpeed needs it too
    "psutil==7.2.2",
    "matplotlib==3.11.2",  # launch/plot.py draws curves.png
    # The ecosystem's formats, for models that leave megatrain: safetensors for weights
    # (launch/convert_checkpoint.py), transformers for Hugging Face export (launch/export_hf.py).
    "safetensors==0.8.0",
    "transformers==5.23.0",
]

extras_require = {
    "dev": [
        "pytest==9.2.0",
        # A hung collective in a multi-rank test fails that test (pytest.ini: timeout)
        # instead of using up CI's time.
        "pytest-timeout==2.4.0",
        "ruff==0.17.6",
        "hypothesis==6.170.17",  # property tests for the tokenizer's round trip
    ],
}

setup(
    name="megatrain",
    version="0.1.0",
    description="GPT-3-style LLM pretraining on DeepSpeed",
    packages=find_packages(include=["megatrain", "megatrain.*", "tokenizer", "tokenizer.*"]),
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras_require,
    ext_modules=[fused_adamw_extension()],
    cmdclass={"build_ext": BuildExtension},
)
