from setuptools import find_packages, setup

# Reward models and the reward service (the tests exercise all of them, so dev includes them).
# rapidocr 3.x bundles its OCR models in the wheel (offline); never add rapidocr-onnxruntime
# beside it: the two install conflicting opencv builds. scipy: transformers' Mask2Former.
# ftfy: open_clip's text cleaning for the hpsv2 tokenizer. open-clip-torch itself (its bundled
# BPE vocabulary) is installed by scripts/setup.sh with --no-deps: it requires torchvision, whose
# PyPI wheels are CUDA builds that break transformers' image processors on a CPU torch
# (docs/environment.md); on a GPU machine `pip install open-clip-torch` works as usual.
REWARDS = [
    "starlette>=0.40",
    "uvicorn>=0.30",
    "rapidocr>=3.0,<4",
    "onnxruntime>=1.18",
    "scipy>=1.11",
    "ftfy>=6.1",
]

setup(
    name="flowpo",
    version="0.1.0",
    description="DeepSpeed trainer for online RL (Flow-GRPO family) on flow-matching text-to-image models",
    packages=find_packages(include=["flowpo", "flowpo.*"]),
    package_data={"flowpo": ["data/prompts/*.jsonl", "data/prompts/*.txt"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<2.15",
        "deepspeed>=0.16,<0.21",
        "triton>=3.0,<3.10",
        "diffusers>=0.35,<0.43",
        "transformers>=4.56,<5.24",
        "tokenizers>=0.21",
        "peft>=0.17,<0.22",
        "wandb>=0.21,<0.32",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "pyyaml>=6.0",
        "numpy>=1.26",
        "pillow>=10.0",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6"],
        "rewards": REWARDS,
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            "tensorboard>=2.16",
            *REWARDS,
        ],
    },
    entry_points={"console_scripts": ["flowpo=flowpo.cli:main"]},
)
