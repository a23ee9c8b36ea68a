"""Fuzz campaign of the checkpoint readers: `python -m tests.fuzz_checkpoints N [options]`.

Mutates small valid checkpoints of every format (torch zip, safetensors, orbax) in many ways
and reads each mutant with `porting.read_checkpoint` and `porting.read_state_dict`, in
worker processes that run under a memory limit (RLIMIT_AS, set once the imports are done)
and a per-case time limit (SIGALRM in the worker; the parent kills a worker that stops
answering). Outcomes per case:

  refused           a CheckpointError (what every broken or hostile file must get)
  accepted          read, and (torch zip) identical bit for bit to
                    `torch.load(weights_only=True, map_location="cpu")`, (safetensors)
                    identical to the safetensors library's reading
  FAIL:<Exception>  any other exception escaped the reader
  FAIL:memory       the memory limit was hit (MemoryError, or the worker killed)
  FAIL:time         the time limit was hit
  FAIL:crash        the worker died (signal)
  FAIL:differs      accepted, but values, dtypes, shapes or keys differ from the reference
  FAIL:ref-refuses  accepted, but the reference reader refuses the file

Mutations (by case number, deterministic from --seed): byte flips anywhere or in the zip
headers, truncation, data.pkl rewritten with valid CRCs (byte flips, hostile ints in sizes/
strides/offsets/numels, opcodes inserted/deleted/duplicated, memo references redirected,
shared-tuple bombs, foreign globals, storage keys swapped), compressed records (zip bombs),
huge record counts, safetensors headers rewritten (shapes, offsets, dtypes, nesting, lengths),
orbax files flipped/truncated/removed and their JSON rewritten.

    python -m tests.fuzz_checkpoints 20000 --workers 2 --json benchmarks/results/fuzz_checkpoints.json \
        --markdown benchmarks/results/fuzz_checkpoints.md
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pickletools
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

TIME_LIMIT = 10.0  # seconds per case (the files are a few KB: any real read takes milliseconds)
MEMORY_HEADROOM = 512 << 20  # bytes of address space a case may add to the worker's

TINY = dict(vocab_size=5, context_length=4, model_dim=4, num_blocks=1, num_heads=2)
# Case mix by format (orbax cases cost ~100x the others: orbax and tensorstore are slow).
FORMAT_WEIGHTS = {"torch": 0.70, "safetensors": 0.25, "orbax": 0.05}


# ----------------------------------------------------------------------------- base checkpoints
def make_bases(directory: str) -> dict[str, list[str]]:
    """Valid checkpoints to mutate: format -> paths."""
    import torch

    import porting
    from tests.porting_helpers import random_reference

    paths = {"torch": [], "safetensors": [], "orbax": []}
    for n, variant in enumerate(("drake", "learning")):
        path = os.path.join(directory, f"{variant}.pt")
        torch.save(random_reference(variant, seed=n, **TINY).state_dict(), path)
        paths["torch"].append(path)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=gen)
    views = {"w": base, "t": base.t(), "s": base[1:, 2:], "e": base[0].expand(2, 5),
             "h": torch.randn(4, generator=gen).half(), "b": torch.randn(3, generator=gen).bfloat16(),
             "p": torch.nn.Parameter(torch.randn(2, generator=gen)), "z": torch.zeros(0, 2)}
    torch.save(views, os.path.join(directory, "views.pt"))
    paths["torch"].append(os.path.join(directory, "views.pt"))
    porting.convert(paths["torch"][0], os.path.join(directory, "flax.safetensors"))
    porting.convert(paths["torch"][1], os.path.join(directory, "torch.safetensors"), "torch-safetensors")
    paths["safetensors"] += [os.path.join(directory, "flax.safetensors"), os.path.join(directory, "torch.safetensors")]
    porting.convert(paths["torch"][0], os.path.join(directory, "model.orbax"))
    paths["orbax"].append(os.path.join(directory, "model.orbax"))
    return paths


# ----------------------------------------------------------------------------- mutations
def _flip(data: bytes, rng, positions=None) -> bytes:
    if not data or (positions is not None and not positions):
        return data
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        at = int(rng.choice(positions)) if positions is not None else int(rng.integers(len(out)))
        out[at] = int(rng.integers(256)) if rng.random() < 0.7 else out[at] ^ (1 << int(rng.integers(8)))
    return bytes(out)


def _records(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _zip(records: dict[str, bytes], compression=zipfile.ZIP_STORED, deflate=()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in records.items():
            zf.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED if name in deflate else compression)
    return buf.getvalue()


_HOSTILE_INTS = [0, 1, 2, 3, 7, 255, 65535, 2**31 - 1, 2**32, 2**40, 2**62, 2**63, 2**64 + 1, 10**30, -1, -(2**31)]


def _int_op(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _ops(pkl: bytes) -> list[tuple[int, int, str, object]]:
    """(start, end, opcode name, argument) of each opcode of a valid pickle."""
    ops = list(pickletools.genops(pkl))
    out = []
    for k, (op, arg, pos) in enumerate(ops):
        end = ops[k + 1][2] if k + 1 < len(ops) else len(pkl)
        out.append((pos, end, op.name, arg))
    return out


def _shared_tuples(depth: int, width: int) -> bytes:
    return b"(" * depth + b"K\x01\x85q\xc8" + (b"h\xc8" * (width - 1) + b"tq\xc8") * depth


_GLOBAL_SWAPS = [b"cposix\nsystem\n", b"cbuiltins\neval\n", b"ctorch\nHalfStorage\n", b"ctorch\nLongStorage\n",
                 b"ctorch._utils\n_rebuild_parameter\n", b"ccollections\nOrderedDict\n", b"ctorch\nFloatStorage\n",
                 b"ctorch._utils\n_rebuild_tensor_v2\n", b"c__builtin__\nset\n", b"ctorch\nTensor\n"]


def _mutate_pickle(pkl: bytes, rng) -> tuple[str, bytes]:
    ops = _ops(pkl)
    kind = str(rng.choice(["flip", "int", "insert", "delete", "duplicate", "memo", "bomb", "global", "key", "truncate"]))
    if kind == "flip":
        return kind, _flip(pkl, rng)
    if kind == "truncate":
        return kind, pkl[: int(rng.integers(len(pkl)))]
    if kind == "int":
        ints = [o for o in ops if o[2] in ("BININT1", "BININT2", "BININT", "LONG1")]
        start, end, _, _ = ints[int(rng.integers(len(ints)))]
        value = _HOSTILE_INTS[int(rng.integers(len(_HOSTILE_INTS)))] if rng.random() < 0.7 else int(rng.integers(0, 64))
        return kind, pkl[:start] + _int_op(value) + pkl[end:]
    if kind == "global":
        globals_ = [o for o in ops if o[2] == "GLOBAL"]
        start, end, _, _ = globals_[int(rng.integers(len(globals_)))]
        return kind, pkl[:start] + _GLOBAL_SWAPS[int(rng.integers(len(_GLOBAL_SWAPS)))] + pkl[end:]
    if kind == "key":
        strings = [o for o in ops if o[2] == "BINUNICODE"]
        start, end, _, _ = strings[int(rng.integers(len(strings)))]
        text = str(rng.choice(["0", "1", "2", "storage", "cpu", "cuda:0", "", "x" * 300, "../data.pkl", "data/0"]))
        raw = text.encode()
        return kind, pkl[:start] + b"X" + struct.pack("<I", len(raw)) + raw + pkl[end:]
    start, end, _, _ = ops[int(rng.integers(1, len(ops) - 1))]
    if kind == "insert":
        piece = bytes([int(rng.choice(list(b"()tqhKRbsuQN.}\x85\x86\x87\x88\x89]ae\x93\x95\x8c")))])
        if piece in (b"q", b"h", b"K"):
            piece += bytes([int(rng.integers(256))])
        return kind, pkl[:start] + piece + pkl[start:]
    if kind == "delete":
        return kind, pkl[:start] + pkl[end:]
    if kind == "duplicate":
        return kind, pkl[:end] + pkl[start:end] * int(rng.integers(1, 200)) + pkl[end:]
    if kind == "memo":
        gets = [o for o in ops if o[2] in ("BINGET", "LONG_BINGET")]
        if not gets:
            return kind, pkl
        start, end, _, _ = gets[int(rng.integers(len(gets)))]
        index = int(rng.integers(0, 40)) if rng.random() < 0.8 else int(rng.integers(0, 2**32))
        op = b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)
        return kind, pkl[:start] + op + pkl[end:]
    # bomb: a size or stride tuple replaced by nested shared tuples
    tuples = [o for o in ops if o[2] in ("TUPLE1", "TUPLE2", "TUPLE3")]
    start, end, _, _ = tuples[int(rng.integers(len(tuples)))]
    depth, width = int(rng.integers(1, 70)), int(rng.integers(2, 300))
    return kind, pkl[:start] + _shared_tuples(min(depth, 60), width) + pkl[end:]


def mutate_torch(data: bytes, rng) -> tuple[str, bytes]:
    """(strategy, mutant bytes) of a torch zip checkpoint."""
    kind = str(rng.choice(["flip", "header-flip", "truncate", "pickle", "record", "deflate", "bomb", "counts", "append"],
                          p=[0.15, 0.15, 0.08, 0.35, 0.08, 0.05, 0.04, 0.05, 0.05]))
    if kind == "flip":
        return kind, _flip(data, rng)
    if kind == "header-flip":
        positions = []
        for signature, span in ((b"PK\x03\x04", 30), (b"PK\x01\x02", 46), (b"PK\x05\x06", 22), (b"PK\x06\x06", 56), (b"PK\x06\x07", 20)):
            at = data.find(signature)
            while at >= 0:
                positions.extend(range(at, min(at + span, len(data))))
                at = data.find(signature, at + 4)
        return kind, _flip(data, rng, positions)
    if kind == "truncate":
        return kind, data[: int(rng.integers(len(data)))]
    records = _records(data)
    names = list(records)
    pkl_name = next(n for n in names if n.endswith("/data.pkl"))
    if kind == "pickle":
        sub, records[pkl_name] = _mutate_pickle(records[pkl_name], rng)
        return f"pickle-{sub}", _zip(records)
    if kind == "record":  # a storage record resized or flipped, CRC valid
        storages = [n for n in names if "/data/" in n]
        name = storages[int(rng.integers(len(storages)))]
        blob = records[name]
        choice = rng.integers(3)
        records[name] = blob[:-1] if choice == 0 else blob + bytes(int(rng.integers(1, 9))) if choice == 1 else _flip(blob, rng)
        return kind, _zip(records)
    if kind == "deflate":
        chosen = {n for n in names if rng.random() < 0.5} or {names[0]}
        return kind, _zip(records, deflate=chosen)
    if kind == "bomb":  # a storage claiming 16 MB of zeros, deflated to ~16 KB
        storages = [n for n in names if "/data/" in n]
        name = storages[int(rng.integers(len(storages)))]
        records[name] = bytes(16 << 20)
        return kind, _zip(records, deflate={name})
    if kind == "counts":  # thousands of extra (empty or tiny) records, or duplicates
        prefix = pkl_name[: -len("data.pkl")]
        for k in range(int(rng.integers(100, 5000))):
            records[f"{prefix}data/x{k}"] = b"" if k % 2 else b"\0" * 4
        return kind, _zip(records)
    # append: bytes before or after the archive
    junk = bytes(rng.integers(0, 256, size=int(rng.integers(1, 200)), dtype=np.uint8))
    return kind, (junk + data) if rng.random() < 0.5 else (data + junk)


def _st_header(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _st_pack(header, body: bytes, raw: bytes | None = None) -> bytes:
    blob = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + body


_JSON_VALUES = [None, True, 0, -1, 1, 2**31, 2**53, 2**64, 1e308, "F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "X", "",
                [], [1], [0, 0], [2**62, 2**62], [0, 2**63], [2**40, 0], [[1]], {}, {"a": 1}, [-1], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]


def mutate_safetensors(data: bytes, rng) -> tuple[str, bytes]:
    kind = str(rng.choice(["flip", "truncate", "header", "length", "nest", "entries"], p=[0.25, 0.1, 0.4, 0.1, 0.05, 0.1]))
    if kind == "flip":
        return kind, _flip(data, rng)
    if kind == "truncate":
        return kind, data[: int(rng.integers(len(data)))]
    header, body = _st_header(data)
    if kind == "length":
        value = int(rng.choice([0, 1, 2, 7, 8, len(data), 2**32, 2**63, 100 * 2**20 + 1])) if rng.random() < 0.5 \
            else int.from_bytes(data[:8], "little") + int(rng.integers(-5, 6))
        return kind, struct.pack("<Q", value % 2**64) + data[8:]
    if kind == "nest":
        depth = int(rng.integers(10, 200_000))
        raw = b'{"w": {"dtype": "F32", "shape": ' + b"[" * depth + b"]" * depth + b', "data_offsets": [0, 4]}}'
        return kind, _st_pack(None, body, raw)
    names = [n for n in header if n != "__metadata__"]
    if kind == "entries":
        for k in range(int(rng.integers(1, 3000))):
            header[f"extra{k}"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
        return kind, _st_pack(header, body)
    for _ in range(int(rng.integers(1, 4))):
        name = names[int(rng.integers(len(names)))]
        field = str(rng.choice(["dtype", "shape", "data_offsets", "__metadata__", "remove"]))
        value = _JSON_VALUES[int(rng.integers(len(_JSON_VALUES)))]
        if field == "remove":
            header.pop(name, None)
        elif field == "__metadata__":
            header["__metadata__"] = value if rng.random() < 0.5 else {"config": json.dumps(value), "variant": "drake"}
        elif name in header:
            if field in ("shape", "data_offsets") and rng.random() < 0.5 and isinstance(header[name][field], list) and header[name][field]:
                entry = list(header[name][field])
                entry[int(rng.integers(len(entry)))] += int(rng.choice([-4, -1, 1, 4, 2**32]))
                value = entry
            header[name][field] = value
    return "header", _st_pack(header, body)


def mutate_orbax(src: str, dst: str, rng) -> str:
    """Copies the orbax directory `src` to `dst` and mutates one of its files; returns the strategy."""
    shutil.copytree(src, dst)
    files = sorted(os.path.join(root, f) for root, _, fs in os.walk(dst) for f in fs)
    target = files[int(rng.integers(len(files)))]
    kind = str(rng.choice(["flip", "truncate", "remove", "json"], p=[0.5, 0.2, 0.1, 0.2]))
    data = open(target, "rb").read()
    if kind == "json":
        jsons = [f for f in files if f.endswith(("metadata", "_METADATA", "_CHECKPOINT_METADATA"))]
        target = jsons[int(rng.integers(len(jsons)))]
        try:
            doc = json.loads(open(target, "rb").read())
        except ValueError:
            doc = {}
        text = json.dumps(doc)
        for number in ("252", "4", "5", "2", "1"):
            if number in text and rng.random() < 0.5:
                text = text.replace(number, str(int(rng.choice([0, 3, 1000, 10**6, 10**12]))), 1)
        if rng.random() < 0.3:
            text = "[" * 100_000 + "]" * 100_000
        data, kind = text.encode(), "json"
    elif kind == "flip" and data:
        data = _flip(data, rng)
    elif kind == "truncate":
        data = data[: int(rng.integers(len(data) + 1))]
    if kind == "remove":
        os.remove(target)
    else:
        with open(target, "wb") as f:
            f.write(data)
    return f"{kind}:{os.path.relpath(target, dst).split(os.sep)[0]}"


# ----------------------------------------------------------------------------- one case
def _same_arrays(ours: dict, theirs: dict) -> bool:
    if list(ours) != list(theirs):
        return False
    for key, a in ours.items():
        b = theirs[key]
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.size and not np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8)):
            return False
    return True


def _torch_reference(path: str):
    import torch

    try:
        theirs = torch.load(path, weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 (any refusal of the reference)
        return None
    if not isinstance(theirs, dict) or not all(isinstance(v, torch.Tensor) for v in theirs.values()):
        return None
    from tests.porting_helpers import torch_dtype_name

    out = {}
    for key, t in theirs.items():
        t = t.detach()
        a = t.contiguous().view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)
        dtype = {"bfloat16": "bfloat16"}.get(torch_dtype_name(t), torch_dtype_name(t))
        out[key] = (dtype, tuple(t.shape), a)
    return out


def _compare_torch(ours: dict, theirs: dict) -> bool:
    if list(ours) != list(theirs):
        return False
    for key, a in ours.items():
        dtype, shape, raw = theirs[key]
        if str(a.dtype) != dtype or a.shape != shape:
            return False
        if a.size and not np.array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8), raw.reshape(-1)):
            return False
    return True


def run_case(fmt: str, path: str) -> str:
    """Reads one mutant; returns its outcome (see the module docstring)."""
    import porting

    try:
        ours = porting.read_state_dict(path)
        try:
            porting.read_checkpoint(path)
        except porting.CheckpointError:
            pass  # a readable state dict that is not a model: fine, the comparison still runs
    except porting.CheckpointError:
        return "refused"
    except MemoryError:
        return "FAIL:memory"
    except Exception as e:  # noqa: BLE001 (the point of the campaign)
        return f"FAIL:{type(e).__name__}"
    if fmt == "torch":
        theirs = _torch_reference(path)
        if theirs is None:
            return "FAIL:ref-refuses"
        return "accepted" if _compare_torch(ours, theirs) else "FAIL:differs"
    if fmt == "safetensors":
        from safetensors.numpy import load_file

        try:
            theirs = load_file(path)
        except Exception:  # noqa: BLE001
            return "FAIL:ref-refuses"
        ordered = {k: theirs[k] for k in ours if k in theirs}
        return "accepted" if set(ours) == set(theirs) and _same_arrays(ours, ordered) else "FAIL:differs"
    return "accepted"


def case_plan(seed: int, index: int, bases: dict[str, list[str]]):
    rng = np.random.default_rng([seed, index])
    formats = list(FORMAT_WEIGHTS)
    fmt = str(rng.choice(formats, p=[FORMAT_WEIGHTS[f] for f in formats]))
    base = bases[fmt][int(rng.integers(len(bases[fmt])))]
    return rng, fmt, base


class _TimeLimit(BaseException):
    """Raised by SIGALRM inside a case (a BaseException: no reader's `except Exception` eats it)."""


def worker(base_dir: str, seed: int) -> None:
    """Answers case numbers read from stdin with JSON lines on stdout."""
    import resource
    import signal
    import warnings

    warnings.simplefilter("ignore")
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)
    bases = json.loads(open(os.path.join(base_dir, "bases.json")).read())
    blobs = {p: open(p, "rb").read() for f in ("torch", "safetensors") for p in bases[f]}
    import porting
    import torch  # noqa: F401  (imported before the memory limit)
    from safetensors.numpy import load_file  # noqa: F401

    torch.set_num_threads(1)
    for fmt, paths in bases.items():  # warm every reader (imports, orbax's threads) before the limit
        for p in paths:
            run_case(fmt, p)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + MEMORY_HEADROOM, vm + MEMORY_HEADROOM))

    def alarm(signum, frame):
        raise _TimeLimit()

    signal.signal(signal.SIGALRM, alarm)
    scratch = tempfile.mkdtemp(prefix="fuzz-", dir=base_dir)
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing a reader prints can corrupt the protocol
    out.write("ready\n")
    out.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # the parent reads stderr only until ready
    for line in sys.stdin:
        index = int(line)
        rng, fmt, base = case_plan(seed, index, bases)
        path = os.path.join(scratch, f"case{index}" + {"torch": ".pt", "safetensors": ".safetensors", "orbax": ""}[fmt])
        try:
            try:
                if fmt == "orbax":
                    strategy = mutate_orbax(base, path, rng)
                else:
                    strategy, data = (mutate_torch if fmt == "torch" else mutate_safetensors)(blobs[base], rng)
                    with open(path, "wb") as f:
                        f.write(data)
            except Exception as e:  # noqa: BLE001 (a bug of the mutator, reported as such, not as the reader's)
                out.write(json.dumps({"case": index, "format": fmt, "base": os.path.basename(base), "strategy": "?",
                                      "outcome": f"HARNESS:{type(e).__name__}", "seconds": None}) + "\n")
                out.flush()
                continue
            begin = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT)
            try:
                outcome = run_case(fmt, path)
            except _TimeLimit:
                outcome = "FAIL:time"
            except MemoryError:
                outcome = "FAIL:memory"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            seconds = time.perf_counter() - begin
        finally:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.remove(path)
        out.write(json.dumps({"case": index, "format": fmt, "base": os.path.basename(base), "strategy": strategy,
                              "outcome": outcome, "seconds": seconds}) + "\n")
        out.flush()


# ----------------------------------------------------------------------------- the campaign
class _Worker:
    def __init__(self, base_dir: str, seed: int):
        self.base_dir, self.seed = base_dir, seed
        self.start()

    def start(self):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz_checkpoints", "--worker", self.base_dir,
                                      "--seed", str(self.seed)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=root, env=env)
        if self._line(600) != "ready\n":  # imports and warm-up; a worker that cannot start is a bug here
            self.proc.kill()
            raise RuntimeError(f"fuzz worker failed to start: {self.proc.stderr.read()[-2000:]}")

    def _line(self, timeout: float) -> str | None:
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                return None
        return self.proc.stdout.readline()

    def ask(self, index: int, timeout: float) -> dict | None:
        """The worker's answer for case `index`, or None if it died or stopped answering."""
        try:
            self.proc.stdin.write(f"{index}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return None
        line = self._line(timeout)
        return json.loads(line) if line else None

    def restart(self):
        self.proc.kill()
        self.proc.wait()
        self.start()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def campaign(n: int, seed: int = 0, workers: int = 1, progress=None) -> dict:
    """Runs cases 0..n-1; returns {"counts": {...}, "by_format": ..., "failures": [...], ...}."""
    import threading

    base_dir = tempfile.mkdtemp(prefix="fuzz-checkpoints-")
    try:
        bases = make_bases(base_dir)
        with open(os.path.join(base_dir, "bases.json"), "w") as f:
            json.dump(bases, f)
        results: list[dict] = []
        lock = threading.Lock()
        next_case = iter(range(n))
        begin = time.perf_counter()

        def drive():
            w = _Worker(base_dir, seed)
            while True:
                with lock:
                    index = next(next_case, None)
                if index is None:
                    break
                answer = w.ask(index, 3 * TIME_LIMIT)
                if answer is None:
                    code = w.proc.poll()
                    _, fmt, base = case_plan(seed, index, bases)
                    outcome = "FAIL:time" if code is None else ("FAIL:memory" if code == -9 else "FAIL:crash")
                    answer = {"case": index, "format": fmt, "base": os.path.basename(base), "strategy": "?",
                              "outcome": outcome, "seconds": None}
                    w.restart()
                with lock:
                    results.append(answer)
                    if progress and len(results) % 500 == 0:
                        progress(len(results), n, time.perf_counter() - begin)
            w.close()

        threads = [threading.Thread(target=drive) for _ in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - begin
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)
    return summarize(results, n, seed, workers, elapsed)


def summarize(results: list[dict], n: int, seed: int, workers: int, elapsed: float) -> dict:
    counts = collections.Counter(r["outcome"] for r in results)
    by_format = collections.defaultdict(collections.Counter)
    by_strategy = collections.defaultdict(collections.Counter)
    for r in results:
        by_format[r["format"]][r["outcome"]] += 1
        by_strategy[f"{r['format']}/{r['strategy'].split(':')[0]}"][r["outcome"]] += 1
    times = sorted(r["seconds"] for r in results if r["seconds"] is not None)
    return {
        "cases": n, "seed": seed, "workers": workers, "wall_seconds": round(elapsed, 1),
        "counts": dict(counts), "failures": sum(v for k, v in counts.items() if not k.startswith(("refused", "accepted"))),
        "by_format": {k: dict(v) for k, v in sorted(by_format.items())},
        "by_strategy": {k: dict(v) for k, v in sorted(by_strategy.items())},
        "case_seconds": {"median": times[len(times) // 2], "p99": times[int(len(times) * 0.99)], "max": times[-1]} if times else None,
        "failed_cases": [r for r in results if not r["outcome"].startswith(("refused", "accepted"))][:50],
        "limits": {"time_seconds": TIME_LIMIT, "memory_headroom_bytes": MEMORY_HEADROOM},
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }


def markdown(summary: dict) -> str:
    outcomes = sorted({o for v in summary["by_format"].values() for o in v})
    lines = [
        "# Fuzz campaign of the checkpoint readers",
        "",
        f"`python -m tests.fuzz_checkpoints {summary['cases']} --seed {summary['seed']} --workers {summary['workers']}`: "
        f"{summary['cases']:,} mutants of small valid checkpoints, each read by `porting.read_state_dict` and "
        f"`porting.read_checkpoint` in a worker process under a memory limit (address space + "
        f"{summary['limits']['memory_headroom_bytes'] >> 20} MiB) and a {summary['limits']['time_seconds']:.0f} s time limit; "
        "accepted torch files compared bit for bit with `torch.load(weights_only=True)`, accepted safetensors files with "
        "the safetensors library.",
        "",
        f"**Failures: {summary['failures']}** (any exception other than CheckpointError, a limit hit, a crash, an accepted "
        f"file that differs from the reference or that the reference refuses). Wall time {summary['wall_seconds']} s on "
        f"{summary['machine']}; per case median {summary['case_seconds']['median'] * 1e3:.1f} ms, "
        f"p99 {summary['case_seconds']['p99'] * 1e3:.1f} ms, max {summary['case_seconds']['max'] * 1e3:.0f} ms.",
        "",
        "| format | " + " | ".join(outcomes) + " |",
        "|---|" + "---|" * len(outcomes),
    ]
    for fmt, counts in summary["by_format"].items():
        lines.append(f"| {fmt} | " + " | ".join(f"{counts.get(o, 0):,}" for o in outcomes) + " |")
    lines += ["", "| mutation | " + " | ".join(outcomes) + " |", "|---|" + "---|" * len(outcomes)]
    for strategy, counts in summary["by_strategy"].items():
        lines.append(f"| {strategy} | " + " | ".join(f"{counts.get(o, 0):,}" for o in outcomes) + " |")
    if summary["failed_cases"]:
        lines += ["", "Failed cases (first 50): " + ", ".join(f"{r['case']} {r['format']}/{r['strategy']} {r['outcome']}"
                                                           for r in summary["failed_cases"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz_checkpoints", description=__doc__.split("\n\n")[0])
    p.add_argument("cases", type=int, nargs="?", default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--markdown", metavar="OUT")
    p.add_argument("--worker", metavar="BASE_DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.seed)
        return 0

    def progress(done, total, seconds):
        print(f"{done:,}/{total:,} cases, {seconds:.0f} s", file=sys.stderr, flush=True)

    summary = campaign(args.cases, args.seed, args.workers, progress)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(summary))
    print(json.dumps({k: summary[k] for k in ("cases", "failures", "counts", "wall_seconds")}))
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
