"""megatron-tempnet: Megatron-style pretraining with learned per-token temperatures (TempNet + DRO)."""
from setuptools import find_packages, setup

setup(
    name="megatron-tempnet",
    version="0.1.0",
    description="Tensor/pipeline-parallel GPT and LLaMA pretraining on megatron-core with a TempNet head and a DRO loss",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_tempnet", "megatron_tempnet.*"]) + ["tempnet_kernels"],
    package_dir={"tempnet_kernels": "kernels"},
    install_requires=[
        # torch is not pinned to an exact build: on CPU machines install torch==2.13.0 (CPU wheel) first.
        "torch>=2.4",
        "megatron-core==0.16.1",
        "numpy",
        "orjson",  # preprocessing's JSONL parser: about 2.5x the standard library's json
        "packaging",
        "psutil",  # needed by megatron-core's dist_checkpointing at run time
        "pyyaml",
        "sentencepiece",
        "tokenizers",  # byte-level BPE training (tools/train_tokenizer.py) and the hf encoder
        "gigatoken>=0.10,<0.11",  # the fast encoder behind --tokenizer-backend auto; its sentencepiece reader is pinned
        "tensorboard",
        "tqdm",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "triton"],
        "hf": ["transformers>=5", "safetensors"],
        "plots": ["matplotlib", "Pillow"],  # benchmark plots, tools/shade_tokens.py PNGs
        "dev": ["pytest", "pytest-timeout", "triton", "transformers>=5", "safetensors", "matplotlib", "Pillow"],
    },
    entry_points={
        "console_scripts": [
            "tempnet-train=megatron_tempnet.train:main",
        ],
    },
)
