"""Small C kernels for the CPU, built with the system compiler on first use.

``dots_f32(f, r) = (<f, r>, ||r||^2)`` for contiguous float32 CPU tensors, the products exact in
float64 and summed in float64 (see ``dots.c``). It exists for speed alone: the compiled
reduction of `gradsynth.rules.fused` gives the same float64-accurate values at 0.9-1.2x the
time of ``torch.add`` on AVX2 hosts, and this one at ~0.75x, because it prefetches.

For bfloat16 on x86 processors with AVX2 and FMA (``bf16.c``): `dots_bf16`, the same sums with
every product exact in float64 (tighter than the compiled kernel's float32 block sums), and
`apply_bf16`, the elementwise kernels ``linear`` (``out = w*r + g*f``), ``sago`` and ``prefer``
(`gradsynth.rules.fused`), computed in float32 with the compiled kernels' operations in their
order and rounded once to bfloat16. The compiled kernels' bfloat16 <-> float32 conversions cost
1.0-1.4x ``torch.add`` on cached tensors on AVX2; these kernels widen a bfloat16 value by an
interleave with zeros and ran at 0.6-0.8x over a Llama-shaped gradient list. The callers
(`gradsynth.rules.fused`) pass only plain contiguous tensors of one shape, of any size.

The shared library is compiled once per source, compiler and processor into
``$GRADSYNTH_CACHE/native`` (default ``~/.cache/gradsynth/native``, created ``0700``), under an
exclusive ``flock`` on ``.lock`` there so that concurrent processes build it once, and checked
against exactly rounded sums (and, for bfloat16, torch's own rounding) before it is trusted.

Nothing another user could have planted is ever loaded (the shared-cache guarantee):

- the folder must be owned by this user and not writable by group or others (`gradsynth.owned_files`),
  else one log line and the compiled path;
- each build runs in a fresh ``0700`` folder of its own (``mkdtemp``), the library is made ``0600``
  and its SHA-256 written to an owner-only ``dots-<key>.so.sha256``, then both are renamed into
  place (atomically: no process sees half a file);
- before ``dlopen`` the library is opened without following links, the open descriptor checked
  (a regular file, this user's, not writable by others) and its bytes hashed against the
  manifest, and that very descriptor is loaded (``/proc/self/fd/N``), so no constructor of any
  other file runs; a pair that does not check out is rebuilt;
- a library without every kernel symbol is refused (compiled path), never an ``AttributeError``.

When the cache cannot be written, one private temporary folder per process
(``gradsynth-native-*``) serves every build and is removed at exit. Without a C compiler, on a
failed build or check, with a refused cache, or with ``GRADSYNTH_NATIVE=0`` (and for bfloat16
without AVX2 and FMA), `dots_f32` and `dots_bf16` return None and `apply_bf16` False, and the
caller takes the compiled path: nothing but speed depends on this module.

The kernels run on one thread; with more than one torch thread the compiled kernels' parallel
loops are used instead (the functions decline as above).
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradsynth.owned_files import Untrusted, folder_problem, locked, open_trusted, read_all, read_trusted

#: The elementwise bfloat16 kernels of ``bf16.c`` (see `apply_bf16`).
APPLIES = ("linear", "sago", "prefer")
_SOURCE = Path(__file__).with_name("dots.c")
_BF16_SOURCE = Path(__file__).with_name("bf16.c")
# -march=native is not known to every compiler. No fused multiply-add contraction: the bfloat16
# apply must round its two products and its sum as the compiled kernel does.
_FLAG_SETS = (["-O3", "-march=native", "-ffp-contract=off"], ["-O3", "-ffp-contract=off"])
#: (library or None once tried, whether its bfloat16 kernels may run, reason it is None).
_state: dict[str, Any] = {"library": None, "bf16": False, "tried": False, "reason": "not built yet"}
#: This process's fallback build folder (when the cache cannot be written) and the descriptors of
#: the libraries it loaded (kept open: see `_load`).
_private: dict[str, Any] = {"folder": None, "descriptors": []}
_log = logging.getLogger(__name__)


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _processor() -> str:
    # -march=native code must not be loaded on another processor sharing the cache folder.
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            model = next((line for line in info if line.startswith(("model name", "Model"))), "")
    except OSError:
        model = ""
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{platform.machine()}|{platform.processor()}|{model.strip()}|{capability}"


def _private_folder() -> Path:
    """This process's own temporary build folder (``0700``), made once and removed at exit."""
    if _private["folder"] is None:
        folder = Path(tempfile.mkdtemp(prefix="gradsynth-native-"))
        owner = os.getpid()
        # Only the process that made it removes it (a forked child exits without atexit anyway).
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(folder, ignore_errors=True))
        _private["folder"] = folder
    return _private["folder"]


def _cache_folder() -> Path:
    """``$GRADSYNTH_CACHE/native`` if it is writable, else `_private_folder`; `Untrusted` if shared."""
    root = Path(os.environ.get("GRADSYNTH_CACHE") or Path.home() / ".cache" / "gradsynth") / "native"
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return _private_folder()
    problem = folder_problem(root, follow=False)
    if problem:
        raise Untrusted(
            f"the kernel cache {root} {problem}, so another user could plant a library there; "
            "not loading from it (make it yours with chmod go-w, or set GRADSYNTH_CACHE to a private folder)"
        )
    try:
        with tempfile.NamedTemporaryFile(dir=root, prefix=".probe-"):
            return root
    except OSError:
        return _private_folder()


def _manifest(target: Path) -> Path:
    """The owner-only file next to a library holding the SHA-256 it had when it was built."""
    return target.with_name(f"{target.name}.sha256")


def _intact(target: Path) -> bool:
    """Whether ``target`` and its manifest are trusted files that agree (checked again at load)."""
    try:
        return hashlib.sha256(read_trusted(target)).hexdigest() == read_trusted(_manifest(target)).decode()
    except (OSError, Untrusted, UnicodeDecodeError):
        return False


def _publish(built: Path, target: Path) -> None:
    """Record ``built``'s SHA-256 in an owner-only manifest, then rename both into place."""
    os.chmod(built, 0o600)  # in our own 0700 build folder: no link can be there
    digest = hashlib.sha256(built.read_bytes()).hexdigest()
    manifest = built.with_name("manifest")
    with open(os.open(manifest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.write(digest)
    os.replace(built, target)  # atomic: another process sees all of it or nothing
    os.replace(manifest, _manifest(target))


def _build(compiler: str) -> Path:
    """Compile ``dots.c`` and ``bf16.c`` into the cache (or find it there); raises ``OSError`` on failure.

    Under the cache's lock, so that concurrent processes build once; each build happens in a fresh
    ``0700`` folder of its own (no name there is predictable to anyone else).
    """
    source = _SOURCE.read_bytes() + b"\0" + _BF16_SOURCE.read_bytes()
    folder = _cache_folder()
    errors = []
    with locked(folder / ".lock"):
        for flags in _FLAG_SETS:
            parts = [source, compiler.encode(), " ".join(flags).encode(), _processor().encode()]
            key = hashlib.sha256(b"\0".join(parts))
            target = folder / f"dots-{key.hexdigest()[:16]}.so"
            if _intact(target):
                return target
            private = Path(tempfile.mkdtemp(dir=folder, prefix=".build-"))
            built = private / target.name
            command = [
                compiler,
                *flags,
                "-shared",
                "-fPIC",
                "-o",
                str(built),
                str(_SOURCE),
                str(_BF16_SOURCE),
            ]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
                if done.returncode == 0:
                    _publish(built, target)
                    return target
                errors.append((done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1])
            except (OSError, subprocess.SubprocessError) as error:
                errors.append(str(error))
            finally:
                shutil.rmtree(private, ignore_errors=True)
    raise OSError(f"{compiler} could not build {_SOURCE.name}: {errors[-1]}")


def _load(target: Path) -> ctypes.CDLL:
    """``dlopen`` of ``target`` after checking the very file opened: owned by this user, not writable
    by others, and with the SHA-256 its owner-only manifest recorded at build time. `Untrusted`
    otherwise, before any of its code (constructors included) has run."""
    try:
        fd = open_trusted(target)
    except Untrusted as err:
        raise Untrusted(f"the kernel library {target} {err}; not loading it") from err
    try:
        digest = hashlib.sha256(read_all(fd)).hexdigest()
        recorded = read_trusted(_manifest(target)).decode()
    except (OSError, Untrusted, UnicodeDecodeError) as err:
        os.close(fd)
        raise Untrusted(
            f"the kernel library {target} has no trusted manifest ({err}); not loading it"
        ) from err
    if digest != recorded:
        os.close(fd)
        raise Untrusted(f"the kernel library {target} does not match the SHA-256 recorded when it was built")
    # Load the descriptor checked, not the name again: the file cannot be swapped in between. It
    # stays open so that its number (the name the loader knows the library by) is never reused.
    proc = f"/proc/self/fd/{fd}"
    try:
        loaded = ctypes.CDLL(proc if os.path.exists(proc) else str(target))
    except OSError:
        os.close(fd)
        raise
    _private["descriptors"].append(fd)
    return loaded


def _bind(loaded: ctypes.CDLL) -> None:
    """Declare the kernels' signatures; ``AttributeError`` where the library lacks one."""
    loaded.gradsynth_dots_f32.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.POINTER(ctypes.c_double),
    ]
    loaded.gradsynth_dots_f32.restype = None
    loaded.gradsynth_dots_bf16.argtypes = loaded.gradsynth_dots_f32.argtypes
    loaded.gradsynth_dots_bf16.restype = None
    for name in APPLIES:
        function = getattr(loaded, f"gradsynth_{name}_bf16")
        function.argtypes = [*[ctypes.c_void_p] * 3, ctypes.c_int64, ctypes.c_float, ctypes.c_float]
        function.restype = None
    loaded.gradsynth_bf16_supported.restype = ctypes.c_int


def _check(library: ctypes.CDLL) -> None:
    """One call on values whose float64 sums are known exactly; ``OSError`` if it disagrees."""
    f = torch.arange(-20.0, 21.0) / 8  # 41 elements: the vector loop and the tail both run
    r = torch.arange(41.0).flip(0) / 4
    out = (ctypes.c_double * 2)()
    library.gradsynth_dots_f32(f.data_ptr(), r.data_ptr(), f.numel(), out)
    expected = (
        math.fsum(a * b for a, b in zip(f.tolist(), r.tolist(), strict=True)),
        math.fsum(b * b for b in r.tolist()),
    )
    if (out[0], out[1]) != expected:
        raise OSError(f"the built kernel gave {tuple(out)} for {expected}")


def _bf16_supported(library: ctypes.CDLL) -> bool:
    """Whether this processor runs the AVX2 + FMA bfloat16 kernels (always False off x86)."""
    return bool(library.gradsynth_bf16_supported())


def _check_bf16(library: ctypes.CDLL) -> None:
    """The bfloat16 kernels on values with known results; ``OSError`` if they disagree.

    41 elements run both the vector loops and the scalar tails; the apply must equal float32
    arithmetic rounded to bfloat16 by torch, halfway cases and NaN included.
    """
    f = (torch.arange(-20.0, 21.0) / 8).bfloat16()
    r = (torch.arange(41.0).flip(0) / 4).bfloat16()
    sums = (ctypes.c_double * 2)()
    library.gradsynth_dots_bf16(f.data_ptr(), r.data_ptr(), f.numel(), sums)
    fs, rs = f.double().tolist(), r.double().tolist()
    expected = (math.fsum(a * b for a, b in zip(fs, rs, strict=True)), math.fsum(b * b for b in rs))
    if (sums[0], sums[1]) != expected:
        raise OSError(f"the built bfloat16 kernel gave {tuple(sums)} for {expected}")
    # 1 + 2**-8 + 2**-15 and neighbours round up, down and to even; inf - inf gives NaN.
    r = torch.tensor([1.0, 1.0 + 2**-7, -3.0, 2**-133, math.inf, 0.5] * 7, dtype=torch.bfloat16)
    f = torch.tensor([2**-8 + 2**-15, 2**-8, 2**-8, 0.0, -math.inf, math.nan] * 7, dtype=torch.bfloat16)
    for name, want in expected_applies(f.float(), r.float()).items():
        out = torch.empty_like(r)
        kernel = getattr(library, f"gradsynth_{name}_bf16")
        kernel(out.data_ptr(), f.data_ptr(), r.data_ptr(), r.numel(), 1.0, 1.0)
        want = want.bfloat16()
        nan = want.isnan()
        if not torch.equal(out.isnan(), nan) or not torch.equal(out[~nan], want[~nan]):
            raise OSError(f"the built bfloat16 {name} kernel gave {out.tolist()} for {want.tolist()}")


def expected_applies(f: Tensor, r: Tensor, alpha: float = 1.0, gamma: float = 1.0) -> dict[str, Tensor]:
    """What each kernel of `APPLIES` computes, as float32 eager operations on float32 ``f``, ``r``.

    Round the results to bfloat16 to get the kernels' outputs (NaN payloads aside).
    """
    a, b = r * alpha, gamma * f
    conflict = (f * 2.0**117) * (r * 2.0**117) < 0
    return {
        "linear": a + b,
        "sago": torch.where(conflict, a + (b - b), b + (a - a)),
        "prefer": a + torch.where(conflict, b - b, b),
    }


def library() -> ctypes.CDLL | None:
    """The loaded kernel, building it on the first call; None where it cannot be had."""
    if _state["tried"]:
        return _state["library"]
    _state["tried"] = True
    if os.environ.get("GRADSYNTH_NATIVE", "1") == "0":
        _state["reason"] = "disabled by GRADSYNTH_NATIVE=0"
        return None
    compiler = _compiler()
    if compiler is None:
        _state["reason"] = "no C compiler (cc, gcc or clang) on PATH"
        return None
    try:
        loaded = _load(_build(compiler))
        _bind(loaded)
        _check(loaded)
        bf16 = _bf16_supported(loaded)
        if bf16:
            _check_bf16(loaded)
    except Untrusted as error:
        _state["reason"] = str(error)
        _log.warning("gradsynth: %s; the compiled kernels run instead", error)
        return None
    except AttributeError as error:  # a library that is not ours: one of the kernels is missing
        _state["reason"] = f"the kernel library lacks a kernel ({error})"
        return None
    except OSError as error:
        _state["reason"] = str(error)
        return None
    _state.update(library=loaded, bf16=bf16, reason="built")
    return loaded


def reason() -> str:
    """Why `library` is None (or ``"built"``)."""
    return _state["reason"]


def reset() -> None:
    """Forget the loaded library, so that the next call builds or finds it again (for tests)."""
    _state.update(library=None, bf16=False, tried=False, reason="not built yet")


def dots_f32(forget: Tensor, retain: Tensor) -> tuple[float, float] | None:
    """``(<f, r>, ||r||^2)`` of contiguous float32 CPU tensors; None where the caller must compute them."""
    return _dots(library() if torch.get_num_threads() == 1 else None, "gradsynth_dots_f32", forget, retain)


def _dots(
    loaded: ctypes.CDLL | None, symbol: str, forget: Tensor, retain: Tensor
) -> tuple[float, float] | None:
    """One inner-product kernel of ``loaded`` (None: not here) on two tensors of one dtype."""
    if loaded is None:
        return None
    out = (ctypes.c_double * 2)()
    getattr(loaded, symbol)(forget.data_ptr(), retain.data_ptr(), forget.numel(), out)
    return out[0], out[1]


def bf16_supported() -> bool:
    """Whether the bfloat16 kernels are built and checked for this processor (AVX2 + FMA)."""
    return library() is not None and _state["bf16"]


def _bf16_library() -> ctypes.CDLL | None:
    if torch.get_num_threads() != 1 or not bf16_supported():
        return None
    return _state["library"]


def bf16_available() -> bool:
    """Whether `dots_bf16` and `apply_bf16` run here (built, checked, AVX2 + FMA, one thread)."""
    return _bf16_library() is not None


def dots_bf16(forget: Tensor, retain: Tensor) -> tuple[float, float] | None:
    """``(<f, r>, ||r||^2)`` of contiguous bfloat16 CPU tensors; None where the caller must compute them."""
    return _dots(_bf16_library(), "gradsynth_dots_bf16", forget, retain)


def apply_bf16(kernel: str, out: Tensor, forget: Tensor, retain: Tensor, alpha: float, gamma: float) -> bool:
    """Kernel ``kernel`` of `APPLIES` on contiguous bfloat16 CPU tensors of one shape, into ``out``.

    ``linear``: ``out = alpha * r + gamma * f``; ``sago`` and ``prefer``: the SAGO rules (see
    ``bf16.c``). ``out`` may be ``forget`` or ``retain`` itself. False, writing nothing, where the
    caller must compute it. For ``linear`` the caller keeps ``alpha`` 0 or a normal float32
    number, where float32 arithmetic is what the compiled kernel does.
    """
    loaded = _bf16_library()
    if loaded is None:
        return False
    function = getattr(loaded, f"gradsynth_{kernel}_bf16")
    function(out.data_ptr(), forget.data_ptr(), retain.data_ptr(), out.numel(), float(alpha), float(gamma))
    # Written behind torch's back: count it as an in-place write, as the other paths do.
    torch.autograd.graph.increment_version(out)
    return True


# ----- geometry sums of one chunk (gradsynth.rules.geometry_sums) ---------------------------------

_GEOMETRY = {torch.float32: "gradsynth_geometry_f32", torch.bfloat16: "gradsynth_geometry_bf16"}
#: Per symbol: the library it was set up on (argument types, first result checked) and the
#: function, or None if it failed its check. Set on first use, so the loading above stays as it
#: is; a library loaded again (`reset`) is set up again.
_geometry_functions: dict[str, tuple[ctypes.CDLL, Any]] = {}


def _geometry_function(symbol: str) -> Any:
    loaded = library() if torch.get_num_threads() == 1 else None
    if loaded is None:
        return None
    entry = _geometry_functions.get(symbol)
    if entry is None or entry[0] is not loaded:
        function = getattr(loaded, symbol, None)
        if function is not None:
            function.argtypes = [*[ctypes.c_void_p] * 3, ctypes.c_int64, ctypes.c_void_p]
            function.restype = None
            function = function if _check_geometry(function, symbol) else None
        entry = _geometry_functions[symbol] = (loaded, function)
    return entry[1]


def _check_geometry(function: Any, symbol: str) -> bool:
    """One call on values whose float64 sums are known exactly (vector loop and tail both run)."""
    dtype = torch.float32 if symbol.endswith("f32") else torch.bfloat16
    f = (torch.arange(-20.0, 21.0) / 8).to(dtype)
    r = (torch.arange(41.0).flip(0) / 4 - 3).to(dtype)
    g = (torch.arange(41.0) / 16 - 1).to(dtype)
    acc = torch.zeros(7, dtype=torch.float64)
    function(f.data_ptr(), r.data_ptr(), g.data_ptr(), f.numel(), acc.data_ptr())
    a, b, c = (t.double().tolist() for t in (f, r, g))
    pairs = [(a, a), (b, b), (a, b), (c, c), (c, a), (c, b)]
    want = [math.fsum(x * y for x, y in zip(u, v, strict=True)) for u, v in pairs]
    want.append(float(sum(x * y < 0 for x, y in zip(a, b, strict=True))))
    return acc.tolist() == want


def add_geometry(sums: Tensor, forget: Tensor, retain: Tensor, update: Tensor) -> bool:
    """Add the 7 geometry sums of contiguous float32 or bfloat16 CPU tensors of one shape into the
    float64 CPU tensor ``sums`` (written in place, nothing read on the host); False where the
    caller must compute them (one thread only, like the other kernels)."""
    symbol = _GEOMETRY.get(forget.dtype)
    function = None if symbol is None else _geometry_function(symbol)
    if function is None:
        return False
    function(forget.data_ptr(), retain.data_ptr(), update.data_ptr(), forget.numel(), sums.data_ptr())
    torch.autograd.graph.increment_version(sums)
    return True


#: The one-loop rule kernels with their geometry sums, per dtype (`rule_geometry`).
_RULE_GEOMETRY = {
    torch.float32: "gradsynth_rule_geometry_f32",
    torch.bfloat16: "gradsynth_rule_geometry_bf16",
}


def _rule_geometry_function(dtype: torch.dtype) -> Any:
    symbol = _RULE_GEOMETRY.get(dtype)
    # (the bfloat16 one runs where the bfloat16 kernels it repeats do: AVX2 and FMA, checked)
    if dtype == torch.bfloat16:
        loaded = _bf16_library()
    else:
        loaded = library() if torch.get_num_threads() == 1 else None
    if symbol is None or loaded is None:
        return None
    entry = _geometry_functions.get(symbol)
    if entry is None or entry[0] is not loaded:
        function = getattr(loaded, symbol, None)
        if function is not None:
            function.argtypes = [
                *[ctypes.c_void_p] * 3,
                ctypes.c_int64,
                ctypes.c_float,
                ctypes.c_float,
                ctypes.c_int,
                ctypes.c_void_p,
            ]
            function.restype = None
            function = function if _check_rule_geometry(function, dtype) else None
        entry = _geometry_functions[symbol] = (loaded, function)
    return entry[1]


#: The rules of ``gradsynth_rule_geometry_f32`` and ``_bf16``, by their ``kind`` argument.
RULE_KINDS = {"sago": 0, "prefer": 1, "linear": 2}


def _check_rule_geometry(function: Any, dtype: torch.dtype) -> bool:
    """The three rules on values with known results (infinities, NaN, zeros, underflowing products):
    the update as `expected_applies` (rounded to bfloat16 for bfloat16), the sums exactly (small
    dyadic values)."""
    f = torch.tensor([2**-8 + 2**-15, -(2.0**-8), 2**-8, 0.0, -1.5, 0.25, 1e-30] * 7).to(dtype)
    r = torch.tensor([1.0, 1.0 + 2**-7, -3.0, 2**-133, 0.5, -0.75, -1e-30] * 7).to(dtype)
    for name, kind in RULE_KINDS.items():
        out, acc = torch.empty_like(r), torch.zeros(7, dtype=torch.float64)
        function(out.data_ptr(), f.data_ptr(), r.data_ptr(), f.numel(), 0.5, 2.0, kind, acc.data_ptr())
        if not torch.equal(out, expected_applies(f.float(), r.float(), 0.5, 2.0)[name].to(dtype)):
            return False
        a, b, c = (t.double().tolist() for t in (f, r, out))
        pairs = [(a, a), (b, b), (a, b), (c, c), (c, a), (c, b)]
        want = [math.fsum(x * y for x, y in zip(u, v, strict=True)) for u, v in pairs]
        want.append(float(sum(x * y < 0 for x, y in zip(a, b, strict=True))))
        # 1e-30 * 1e-30 etc. are not dyadic-small: compare those sums to rounding, the rest exactly.
        got = acc.tolist()
        if got[6] != want[6] or any(
            abs(x - y) > 1e-15 * max(abs(y), 1.0) for x, y in zip(got, want, strict=True)
        ):
            return False
    return True


def rule_geometry(
    kind: str, out: Tensor, forget: Tensor, retain: Tensor, alpha: float, gamma: float, sums: Tensor
) -> bool:
    """Kernel ``kind`` of `RULE_KINDS` (``linear``: ``alpha * r + gamma * f``, the caller keeping
    ``alpha`` 0 or a normal float32 number) on contiguous float32 or bfloat16 CPU tensors into
    ``out``, with the 7 geometry sums added into the float64 tensor ``sums``, in one loop; False
    (nothing written) where the caller must compute it. Float32: the compiled kernels' float32
    operations; bfloat16: those of `apply_bf16` (the same operations, rounded once)."""
    function = _rule_geometry_function(out.dtype)
    if function is None:
        return False
    function(
        out.data_ptr(),
        forget.data_ptr(),
        retain.data_ptr(),
        out.numel(),
        alpha,
        gamma,
        RULE_KINDS[kind],
        sums.data_ptr(),
    )
    torch.autograd.graph.increment_version(out)
    torch.autograd.graph.increment_version(sums)
    return True


def geometry_available(dtype: torch.dtype) -> bool:
    """Whether `add_geometry` runs on ``dtype`` here (float32 or bfloat16, built and checked, one thread)."""
    symbol = _GEOMETRY.get(dtype)
    return symbol is not None and _geometry_function(symbol) is not None
