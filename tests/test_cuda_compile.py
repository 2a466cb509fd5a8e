"""The CUDA kernel's device code compiles for sm_80 and sm_90 without a GPU or torch's CUDA build.

csrc/cuda/contrastive_cuda.cu includes only CUDA headers, so nvcc can compile it here. The
flags match what torch's CUDAExtension passes (no implicit half/bfloat16 conversions). The
PTX must hold WMMA tensor-core products with bf16 and fp16 operands and fp32 accumulators.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

NVCC = shutil.which("nvcc")
SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "contrastive_cuda.cu"
FLAGS = ["-std=c++17", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__"]

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Object files for sm_80 and sm_90 and the sm_90 PTX, built at the same time."""
    out = tmp_path_factory.mktemp("nvcc")
    jobs = {f"sm_{a}": [NVCC, "-c", f"-arch=sm_{a}", *FLAGS, "-o", str(out / f"sm_{a}.o"), str(SOURCE)]
            for a in (80, 90)}
    jobs["ptx"] = [NVCC, "-ptx", "-arch=sm_90", *FLAGS, "-o", str(out / "sm_90.ptx"), str(SOURCE)]
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, cmd in jobs.items()}
    results = {name: (p.wait(timeout=600), p.stdout.read()) for name, p in procs.items()}
    return out, results


@pytest.mark.parametrize("job", ["sm_80", "sm_90", "ptx"])
def test_device_code_compiles_without_warnings(compiled, job):
    _, results = compiled
    returncode, output = results[job]
    assert returncode == 0, output
    assert "warning" not in output, output


@pytest.mark.parametrize("operands", [".f32.bf16.bf16.f32", ".m16n16k16.f32.f32"])  # bf16; fp16 (implicit)
def test_products_use_tensor_cores(compiled, operands):
    out, _ = compiled
    ptx = (out / "sm_90.ptx").read_text()
    assert any(operands in line for line in ptx.splitlines() if "wmma.mma.sync" in line)


def cuda_include_dir():
    """CUDA's headers: $CUDA_HOME, beside nvcc, or a /usr/local/cuda* install."""
    import glob
    import os

    candidates = [os.environ.get("CUDA_HOME", ""), str(Path(os.path.realpath(NVCC)).parents[1])]
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for root in candidates:
        if root and (Path(root) / "include" / "cuda_runtime.h").exists():
            return Path(root) / "include"
    return None


@pytest.mark.parametrize("source", ["cuda/contrastive_cuda.cpp", "bindings.cpp"])
def test_torch_glue_compiles_with_cuda_enabled(tmp_path, source):
    """The host-side glue (torch tensors -> launchers) is only built by a CUDA torch; check its
    syntax here against the CPU wheel's headers. The wheel lacks one generated CUDA config
    header, which an empty stand-in replaces for this syntax-only check."""
    import sysconfig

    import torch.utils.cpp_extension as ext

    include = cuda_include_dir()
    if include is None:
        pytest.skip("CUDA headers not found")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [tmp_path, *ext.include_paths(), sysconfig.get_paths()["include"], include]
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-DDEEPCUT_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
           *[f"-I{p}" for p in includes], str(SOURCE.parents[1] / source)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
