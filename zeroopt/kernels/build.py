"""Compiling zeroopt's C kernels with the system's C compiler, cached, loaded with ctypes.

The kernels are plain C on raw pointers (no torch or Python headers), so one builds in about
half a second. The library lands in a cache directory: ``$ZEROOPT_CACHE_DIR``, else
``~/.cache/zeroopt``. Its file name is a hash of the source, the flags and what the compiler
makes of them on this machine (its predefined macros: its version, the architecture and the
CPU features ``-march=native`` turns on), so a shared home directory on a mixed cluster, or a
compiler upgrade, gets a new build instead of a wrong one. Each process compiles into its own
temporary file and renames it into place atomically: ranks starting together may all compile,
but none ever loads a half-written file.

``ZEROOPT_NATIVE=0`` turns every kernel off (the torch code paths then run).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

# No -ffast-math: the results must match torch's bit for bit. -ffp-contract=off keeps the
# compiler from fusing a multiply and an add into an FMA (one rounding instead of two); a
# kernel that wants an FMA (where torch's own kernel uses one) writes fmaf.
# -fno-math-errno (as torch is built) lets sqrtf vectorize; it changes no value.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]


def enabled() -> bool:
    """Whether native kernels may be used at all (``ZEROOPT_NATIVE`` is not ``0``)."""
    return os.environ.get("ZEROOPT_NATIVE", "1") != "0"


def compiler() -> str:
    """The C compiler: ``$CC``, else gcc, else cc.

    Raises:
        RuntimeError: none found.
    """
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc/cc) found")
    return cc


@lru_cache(maxsize=None)
def predefined_macros(cc: str) -> str:
    """What ``cc`` predefines under the optimisation flags: its version and the CPU's
    features, part of the cache key."""
    return subprocess.run([cc, *FLAGS[:3], "-dM", "-E", "-x", "c", os.devnull],
                          capture_output=True, text=True, check=True).stdout


def openmp_flags(predefined: str) -> list[str]:
    """``-fopenmp`` where the kernels then share torch's OpenMP runtime: GCC's libgomp, which
    torch's Linux wheels load (the same soname, so the kernels bind to torch's copy and its
    threads). Beside another runtime (Intel's or LLVM's), two thread pools would fight over the
    cores: there the kernels stay single-threaded."""
    try:
        with open("/proc/self/maps") as maps:
            names = {Path(line.split()[-1]).name for line in maps if "omp" in line}
    except OSError:
        return []
    runtimes = {name.split(".")[0] for name in names
                if name.startswith(("libgomp", "libiomp", "libomp"))}
    return ["-fopenmp"] if runtimes == {"libgomp"} and "__clang__" not in predefined else []


def compile_source(source: Path, cc: str, flags: list[str], predefined: str) -> Path:
    """The shared library of ``source`` built with ``flags``, from the cache or compiled into
    it.

    Args:
        source: the C file.
        cc: the compiler.
        flags: every flag (``FLAGS`` and any extra).
        predefined: ``predefined_macros(cc)`` (part of the cache key).

    Returns:
        The library's path.

    Raises:
        RuntimeError: the compiler failed (its message included).
    """
    headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]  # what it may include
    digest = hashlib.sha256("\0".join([source.read_text(), *headers, *flags,
                                       predefined]).encode())
    cache = Path(os.environ.get("ZEROOPT_CACHE_DIR") or Path.home() / ".cache" / "zeroopt")
    path = cache / f"{source.stem}-{digest.hexdigest()[:16]}.so"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=path.stem + ".", suffix=".tmp")
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, "-o", tmp, str(source), "-lm"], capture_output=True,
                              text=True)
        if done.returncode:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()}")
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would keep others sharing the cache out
        os.replace(tmp, path)  # atomic: another process sees no file or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def build(source: Path) -> ctypes.CDLL:
    """Compile (or find in the cache) and load ``source``, with OpenMP where torch's runtime
    allows it (``openmp_flags``), else single-threaded.

    Raises:
        RuntimeError, OSError, subprocess.CalledProcessError: no compiler, or the build or
            load failed.
    """
    cc = compiler()
    predefined = predefined_macros(cc)
    openmp = openmp_flags(predefined)
    try:
        path = compile_source(source, cc, FLAGS + openmp, predefined)
    except RuntimeError:
        if not openmp:
            raise
        path = compile_source(source, cc, FLAGS, predefined)  # no OpenMP library
    return ctypes.CDLL(str(path))
