"""Build script: the Python package, its Triton kernels (``kernels/`` installed as
``deepcut_fast.kernels``) and, once csrc/ holds sources, the compiled extension.

Requirements are ranges so the package installs beside an existing torch (e.g. a GPU
machine's CUDA build); CI pins exact versions in requirements-ci.txt.
"""
from setuptools import setup

setup(
    name="deepcut_fast",
    version="0.1.0",
    description="Fast DeepCUT contrastive unlearning for fine-tuned language models",
    python_requires=">=3.9",
    packages=["deepcut_fast", "deepcut_fast.kernels"],
    package_dir={"deepcut_fast": "deepcut_fast", "deepcut_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
        "transformers>=4.40",
        "ninja",
    ],
    entry_points={"console_scripts": ["deepcut-fast = deepcut_fast.cli:main"]},
    extras_require={"test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6"]},
)
