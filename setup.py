"""Builds fastpeft._C with CMake + Ninja (CPU always, CUDA when a toolkit is there).

Environment:
  FASTPEFT_CUDA=0/1      force the CUDA kernels off / on (default: on when nvcc and a CUDA
                         build of torch are both found)
  TORCH_CUDA_ARCH_LIST   CUDA architectures, default "8.0;9.0"
  MAX_JOBS               parallel compile jobs
  CUDA_HOME              the CUDA toolkit root (the folder whose bin/ holds the real nvcc)
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _real_toolkit_root(candidate: Path) -> Path | None:
    nvcc = candidate / "bin" / "nvcc"
    if nvcc.is_file() and (candidate / "include" / "cuda_runtime.h").is_file():
        return candidate.resolve()
    return None


def find_cuda_home() -> Path | None:
    """The toolkit root; an nvcc found on PATH may be a wrapper script elsewhere."""
    candidates = [os.environ.get(k) for k in ("CUDA_HOME", "CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
        try:  # a wrapper script: ask the compiler where it lives
            out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True)
            for line in (out.stderr + out.stdout).splitlines():
                if "TOP=" in line:
                    candidates.append(line.split("TOP=", 1)[1].strip())
        except OSError:
            pass
    candidates += ["/usr/local/cuda"]
    for c in candidates:
        if c and (root := _real_toolkit_root(Path(c))):
            return root
    return None


def cuda_wanted() -> tuple[bool, Path | None]:
    import torch

    flag = os.environ.get("FASTPEFT_CUDA", "").strip()
    home = find_cuda_home()
    if flag == "0":
        return False, None
    if flag == "1":
        if home is None or torch.version.cuda is None:
            raise RuntimeError(
                "FASTPEFT_CUDA=1 but no CUDA build is possible: "
                f"toolkit root={home}, torch.version.cuda={torch.version.cuda}"
            )
        return True, home
    return (home is not None and torch.version.cuda is not None), home


def cmake_archs(arch_list: str) -> str:
    """"8.0;9.0+PTX" -> "80-real;90" (CMake's CUDA_ARCHITECTURES syntax)."""
    out = []
    for a in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not a:
            continue
        ptx = a.endswith("+PTX")
        num = a.removesuffix("+PTX").replace(".", "")
        out.append(num if ptx else f"{num}-real")
    return ";".join(out)


def tool(name: str) -> str:
    """cmake / ninja from the building Python's environment (PyPI's cmake 4.x), else PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else (shutil.which(name) or name)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        use_cuda, cuda_home = cuda_wanted()
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info[0]}{sys.version_info[1]}"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={build_dir / 'lib'}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_MAKE_PROGRAM={tool('ninja')}",
            f"-DFASTPEFT_CUDA={'ON' if use_cuda else 'OFF'}",
        ]
        if use_cuda:
            args += [
                f"-DCMAKE_CUDA_COMPILER={cuda_home / 'bin' / 'nvcc'}",
                f"-DCUDAToolkit_ROOT={cuda_home}",
                f"-DCMAKE_CUDA_ARCHITECTURES={cmake_archs(arch_list)}",
                f"-DFASTPEFT_CUDA_ARCH_LIST={arch_list.replace(';', ' ')}",
            ]
        env = dict(os.environ)
        if cuda_home is not None:
            env.setdefault("CUDA_HOME", str(cuda_home))
        cache = build_dir / "CMakeCache.txt"
        configured = build_dir / "fastpeft-configure-args.txt"
        if not cache.exists() or not configured.exists() or configured.read_text() != "\n".join(args):
            if cache.exists():
                cache.unlink()
            subprocess.run([tool("cmake"), "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja", *args],
                           check=True, env=env)
            configured.write_text("\n".join(args))
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([tool("cmake"), "--build", str(build_dir), "-j", jobs], check=True, env=env)
        built = build_dir / "lib" / Path(self.get_ext_filename(ext.name)).name
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, target)


setup(
    ext_modules=[Extension("fastpeft._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
