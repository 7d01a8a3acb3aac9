"""Build script: the compiled backends ``mmloss._C`` (csrc/), against the *installed* torch.

Install with ``pip install --no-build-isolation -e .`` (or without ``-e``): build isolation would
install a second torch (a CUDA build, by default) into a throwaway environment and compile
against it. Metadata lives in pyproject.toml.

- ``MMLOSS_BUILD_CPP=auto|0|1`` (default auto): the C++ ``cpu`` backend. auto builds it when
  torch is importable here and a C++ compiler works, and installs the pure-Python package (with
  a warning) when the build fails; 1 makes any failure an error; 0 skips it.
  ``mmloss.available_backends()["cpu"]`` then says why it is missing.
- ``MMLOSS_BUILD_CUDA=auto|0|1`` (default auto): adds csrc/cuda/*.cu (the ``cuda`` backend) when
  torch is a CUDA build and nvcc is found (auto: only then; 1: required).
- ``MAX_JOBS`` limits ninja's parallel compile jobs (torch.utils.cpp_extension).

The CPU part is five translation units (ops, registration, the AVX-512, AVX2 and portable
epilogues) plus the pybind11 module: ~1–2 minutes on two cores, incremental with ninja.
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _mode(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower() or "auto"
    if value in ("1", "true", "yes", "on"):
        return "1"
    if value in ("0", "false", "no", "off"):
        return "0"
    if value != "auto":
        raise SystemExit(f"{name} must be auto, 0 or 1, got {os.environ[name]!r}")
    return "auto"


def _say(msg: str) -> None:
    print(f"mmloss: {msg}", file=sys.stderr)


def _compiler_works() -> bool:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <vector>\nint main() { std::vector<int> v{1}; return v[0] - 1; }\n")
        try:
            subprocess.run(cxx.split() + ["-std=c++17", src, "-o", os.path.join(tmp, "probe")],
                           check=True, capture_output=True, timeout=120)
        except Exception:
            return False
    return True


def _cuda_sources_hash() -> str:
    """sha256 over the CUDA backend's sources and the shared tile math (csrc/cuda README)."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(glob.glob("csrc/cuda/*")) + ["csrc/include/mmloss/tile_math.h"]:
        if os.path.isfile(path):
            h.update(path.encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _extensions():
    """([Extension], cmdclass) for the compiled backends, or ([], {}) when they are skipped."""
    cpp, cuda = _mode("MMLOSS_BUILD_CPP"), _mode("MMLOSS_BUILD_CUDA")
    if cpp == "0":
        _say("MMLOSS_BUILD_CPP=0: installing without the compiled backends (torch/triton only)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:
        if cpp == "1":
            raise SystemExit(f"MMLOSS_BUILD_CPP=1 but torch cannot be imported at build time ({exc}); "
                             "install torch first and build with --no-build-isolation")
        _say(f"torch is not importable at build time ({type(exc).__name__}); skipping mmloss._C "
             "(install torch first and use `pip install --no-build-isolation`)")
        return [], {}
    if not _compiler_works():
        if cpp == "1":
            raise SystemExit("MMLOSS_BUILD_CPP=1 but no working C++ compiler was found (set CXX)")
        _say("no working C++ compiler; skipping mmloss._C (the torch backend remains)")
        return [], {}

    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/register.cpp", "csrc/module.cpp"]
    # -fopenmp: ATen's at::parallel_for is a header template that runs its whole range on the
    # calling thread unless _OPENMP is defined (torch's CPU builds use OpenMP); without it every
    # epilogue pass ran on one thread. The extension then binds to torch's own libgomp.
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-Wno-unknown-pragmas", "-Wno-psabi", "-fvisibility=hidden", "-fvisibility-inlines-hidden"]
    link_args = ["-fopenmp"]
    define_macros = []
    # cpp_extension adds torch's own nvcc flags (the -std of the torch build, the __CUDA_NO_HALF*
    # defines); scripts/compile_cuda.sh compiles the same sources the same way in CI.
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr"]
    with_cuda = False
    cu_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if cuda != "0" and cu_sources:
        torch_cuda = torch.version.cuda is not None
        nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
        if torch_cuda and nvcc:
            with_cuda = True
        elif cuda == "1":
            raise SystemExit("MMLOSS_BUILD_CUDA=1 needs a CUDA build of torch and nvcc "
                             f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
    common = dict(include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")])
    if with_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
        _say(f"building the cuda backend (csrc/cuda) for TORCH_CUDA_ARCH_LIST={archs or 'torch default'}")
        define_macros.append(("MMLOSS_WITH_CUDA", "1"))
        # The self-check record (mmloss/cuda_selfcheck.json) holds for these exact sources only.
        define_macros.append(("MMLOSS_CUDA_SOURCES", f'"{_cuda_sources_hash()}"'))
        cuda_host = sorted(glob.glob("csrc/cuda/*.cpp"))  # host glue + TORCH_LIBRARY_IMPL(…, CUDA)
        ext = CUDAExtension("mmloss._C", sources + cuda_host + cu_sources, define_macros=define_macros,
                            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_args,
                            **common)
    else:
        ext = CppExtension("mmloss._C", sources, define_macros=define_macros,
                           extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_args, **common)
    strict = cpp == "1"

    class Build(BuildExtension):
        """BuildExtension (ninja), except that under MMLOSS_BUILD_CPP=auto a failed compile
        installs the pure-Python package with a warning instead of failing."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                if strict:
                    raise
                _say(f"building mmloss._C failed ({type(exc).__name__}: {exc}); installing without it "
                     "(set MMLOSS_BUILD_CPP=1 to make this an error)")

    return [ext], {"build_ext": Build.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
