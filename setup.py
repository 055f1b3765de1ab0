from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="aim-mllm",
    version="0.1.0",
    description="Training-free visual token merging and physical pruning for multimodal LLMs (AIM, arXiv 2412.03248)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["aim", "aim.*", "kernels", "kernels.*"]),
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "numpy",
        "tqdm",
    ],
    package_data={
        "aim": ["model_configs/*/config.json", "default_model/*"],
        "aim.integrations.lmms_eval": ["tasks/*.yaml"],
    },
    extras_require={
        "triton": ["triton>=3.0"],
        "plot": ["matplotlib"],
        # decord: lmms-eval's llava_hf imports it at module level
        "eval": ["lmms-eval>=0.7.3", "decord"],
        "test": ["pytest>=8,<10", "triton>=3.0", "matplotlib", "lmms-eval>=0.7.3", "decord"],
    },
    entry_points={
        "console_scripts": ["aim=aim.cli:main"],
        # lmms-eval (>= 0.6) discovers plugin models through this group
        "lmms_eval.models": ["aim=aim.integrations.lmms_eval:manifests"],
    },
)
