"""megatrain: GPT-3-style pretraining on DeepSpeed.

Install with `make install` (torch first, then this package with
--no-build-isolation, so pip never builds against a CUDA torch it downloads).
"""

from setuptools import find_packages, setup

install_requires = [
    # The CPU build of 2.13.0 lies on this machine's disk; an unpinned torch pulls
    # a multi-GB CUDA build.
    "torch==2.13.0",
    "deepspeed==0.19.8",
    "sentencepiece==0.2.3",
    "pyarrow==26.0.1",  # token shards: Arrow IPC, memory-mapped
    "wandb==0.31.0",  # optional logging, offline by default
    "numpy",
    "pyyaml",  # run configs
    "tqdm",  # progress bars for long work
    "matplotlib",  # launch/plot.py draws curves.png
]

extras_require = {
    "dev": [
        "pytest",
        "ruff",
        "hypothesis",  # property tests for the tokenizer's round trip
    ],
    # HF tokenizers is a reference row in bench/tokenizer.py, nothing more.
    "bench": ["tokenizers"],
}

setup(
    name="megatrain",
    version="0.1.0",
    description="GPT-3-style LLM pretraining on DeepSpeed",
    packages=find_packages(include=["megatrain", "megatrain.*", "tokenizer", "tokenizer.*"]),
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras_require,
)
