"""The pickle of a torch state dict, read by a small interpreter with two allow-lists.

Design after torch's `torch/_weights_only_unpickler.py`: the standard `pickle.Unpickler`
would call any importable function a file names, and it cannot bound what a file makes it
build. This interpreter runs only the opcodes `torch.save` writes for a state dict (protocol
2; an opcode list, not a blacklist), answers only the globals of that vocabulary (with inert
markers: nothing is imported, no function of the file's choosing is ever called), and bounds
what it builds:

* the memo, the stack and the MARK nesting have fixed limits, and tuples nest at most
  `MAX_TUPLE_DEPTH` deep (a state dict needs 2), so no memo trick can make the structure
  exponentially larger than the pickle;
* dict keys must be strings: nothing from the file is ever hashed, compared or repr'd as a
  structure, and error messages describe values (`errors.brief`), they never print them.

`REDUCE` is allowed on four markers only: `collections.OrderedDict` (no arguments),
`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter` and `_rebuild_parameter_with_state`;
the caller supplies what they build (see `torch_zip.py`). `BUILD` may attach nothing but a
state dict's `_metadata` (per-module version numbers, dropped). `BINPERSID` hands the storage
reference to the caller.
"""

from __future__ import annotations

import collections
import struct

from porting.errors import brief

MAX_MEMO = 1 << 16  # memo entries (at most ~6 MB); a torch state dict uses about 4 per tensor
MAX_STACK = 1 << 16  # objects on the stack and all marked stacks together; torch batches 1000 pairs
MAX_MARKS = 64  # open MARKs
MAX_TUPLE_DEPTH = 8  # a tensor's rebuild arguments are 2 deep
MAX_NAME = 200  # module and name of a GLOBAL


class Refused(Exception):
    """The pickle is outside what this reader accepts; the message says what and where."""


class Global:
    """An allowed global, as an inert marker: REDUCE dispatches on it, nothing is imported."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __repr__(self):
        return f"{self.module}.{self.name}"


class StateDict(collections.OrderedDict):
    """Stands for the `collections.OrderedDict` a state dict is pickled as."""


ORDERED_DICT = Global("collections", "OrderedDict")
REBUILD_TENSOR = Global("torch._utils", "_rebuild_tensor_v2")
REBUILD_PARAMETER = Global("torch._utils", "_rebuild_parameter")
REBUILD_PARAMETER_WITH_STATE = Global("torch._utils", "_rebuild_parameter_with_state")


def _reader(fmt: str):
    s = struct.Struct(fmt)
    return s.size, s.unpack_from


_U1, _U2, _I4, _U4 = (_reader(f) for f in ("<B", "<H", "<i", "<I"))

_OPCODE_NAMES = {
    b"\x80": "PROTO", b"c": "GLOBAL", b"q": "BINPUT", b"r": "LONG_BINPUT", b"h": "BINGET", b"j": "LONG_BINGET",
    b"(": "MARK", b"}": "EMPTY_DICT", b")": "EMPTY_TUPLE", b"t": "TUPLE", b"\x85": "TUPLE1", b"\x86": "TUPLE2",
    b"\x87": "TUPLE3", b"X": "BINUNICODE", b"J": "BININT", b"K": "BININT1", b"M": "BININT2", b"\x8a": "LONG1",
    b"N": "NONE", b"\x88": "NEWTRUE", b"\x89": "NEWFALSE", b"Q": "BINPERSID", b"R": "REDUCE", b"b": "BUILD",
    b"s": "SETITEM", b"u": "SETITEMS", b".": "STOP",
}
# Opcodes outside the list get their name in the message (pickletools knows them all).
_OTHER_NAMES = {b"\x95": "FRAME", b"\x93": "STACK_GLOBAL", b"\x94": "MEMOIZE", b"\x8c": "SHORT_BINUNICODE",
                b"i": "INST", b"o": "OBJ", b"\x81": "NEWOBJ", b"\x92": "NEWOBJ_EX", b"]": "EMPTY_LIST",
                b"a": "APPEND", b"e": "APPENDS", b"l": "LIST", b"d": "DICT", b"P": "PERSID", b"S": "STRING",
                b"V": "UNICODE", b"I": "INT", b"L": "LONG", b"F": "FLOAT", b"G": "BINFLOAT", b"p": "PUT",
                b"g": "GET", b"\x82": "EXT1", b"\x83": "EXT2", b"\x84": "EXT4", b"\x8b": "LONG4",
                b"U": "SHORT_BINSTRING", b"T": "BINSTRING", b"B": "BINBYTES", b"C": "SHORT_BINBYTES",
                b"\x8e": "BINBYTES8", b"\x8d": "BINUNICODE8", b"\x96": "BYTEARRAY8", b"\x8f": "EMPTY_SET",
                b"\x90": "ADDITEMS", b"\x91": "FROZENSET", b"\x97": "NEXT_BUFFER", b"\x98": "READONLY_BUFFER",
                b"0": "POP", b"1": "DUP", b"2": "POP_MARK"}


_ONE_BYTE_ARGUMENT = frozenset(b"Kqh")  # handled inline by `_Machine.run`


class _Machine:
    """One run of the interpreter over `data`; see `load`."""

    def __init__(self, data, globals_: dict, persistent_load, reduce):
        self.data, self.pos = data, 0
        self.globals, self.persistent_load, self.reduce = globals_, persistent_load, reduce
        self.stack: list = []
        self.marks: list[list] = []
        self.marked = 0  # objects on the marked stacks
        self.ops = {code[0]: getattr(self, "op_" + name) for code, name in _OPCODE_NAMES.items() if name != "STOP"}
        self.memo: dict[int, object] = {}
        self.depths: dict[int, int] = {}  # id(tuple) -> nesting depth
        self.keep: list = []  # keeps every tuple alive so that its id stays its own

    # -- reading the byte stream
    def take(self, n: int):
        end = self.pos + n
        if end > len(self.data):
            raise Refused(f"data.pkl ends in the middle of an opcode argument (byte {self.pos})")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, reader) -> int:
        size, unpack_from = reader
        if self.pos + size > len(self.data):
            raise Refused(f"data.pkl ends in the middle of an opcode argument (byte {self.pos})")
        (value,) = unpack_from(self.data, self.pos)
        self.pos += size
        return value

    def line(self) -> str:
        end = self.data.find(b"\n", self.pos, self.pos + MAX_NAME + 1)
        if end < 0:
            raise Refused(f"GLOBAL at byte {self.pos} of data.pkl has no name of at most {MAX_NAME} characters")
        raw = self.data[self.pos : end]
        self.pos = end + 1
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise Refused(f"GLOBAL at byte {self.pos} of data.pkl names a non-ASCII module or name") from None

    # -- the stack
    def push(self, value) -> None:
        if len(self.stack) + self.marked >= MAX_STACK:
            raise Refused(f"data.pkl stacks more than {MAX_STACK} objects")
        self.stack.append(value)

    def pop(self, what: str = "a value"):
        if not self.stack:
            raise Refused(f"data.pkl pops {what} from an empty stack (byte {self.pos - 1})")
        return self.stack.pop()

    def pop_mark(self) -> list:
        if not self.marks:
            raise Refused(f"data.pkl closes a MARK that was never opened (byte {self.pos - 1})")
        items, self.stack = self.stack, self.marks.pop()
        self.marked -= len(self.stack)
        return items

    def make_tuple(self, items) -> tuple:
        depth = 1 + max((self.depths.get(id(v), 0) for v in items if type(v) is tuple), default=0)
        if depth > MAX_TUPLE_DEPTH:
            raise Refused(f"data.pkl nests tuples more than {MAX_TUPLE_DEPTH} deep (byte {self.pos - 1})")
        value = tuple(items)
        self.depths[id(value)] = depth
        self.keep.append(value)
        return value

    def target_dict(self, opcode: str) -> dict:
        if not self.stack or not isinstance(self.stack[-1], dict):
            raise Refused(f"{opcode} at byte {self.pos - 1} of data.pkl on {brief(self.stack[-1]) if self.stack else 'nothing'}, not a dict")
        return self.stack[-1]

    def set_item(self, target: dict, key, value) -> None:
        if type(key) is not str:
            raise Refused(f"data.pkl uses {brief(key)} as a dict key: only string keys are read")
        target[key] = value

    # -- the interpreter
    def run(self):
        # The opcodes a state dict is made of are handled inline (a method call per opcode
        # would double the reading time of a checkpoint); the rest through `self.ops`.
        data, ops, size = self.data, self.ops, len(self.data)
        memo = self.memo
        while self.pos < size:
            code = data[self.pos]
            self.pos += 1
            if code in _ONE_BYTE_ARGUMENT and self.pos >= size:
                raise Refused(f"data.pkl ends in the middle of an opcode argument (byte {self.pos})")
            if code == 0x4B:  # BININT1
                self.push(data[self.pos])
                self.pos += 1
            elif code == 0x71:  # BINPUT
                self._put(data[self.pos])
                self.pos += 1
            elif code == 0x68:  # BINGET
                index = data[self.pos]
                self.pos += 1
                if index not in memo:
                    raise Refused(f"data.pkl refers to memo entry {index}, which was never stored (byte {self.pos})")
                self.push(memo[index])
            elif code == 0x2E:  # STOP
                if len(self.stack) != 1 or self.marks:
                    raise Refused("data.pkl stops with a malformed stack")
                return self.stack[0]
            else:
                op = ops.get(code)
                if op is None:
                    what = _OTHER_NAMES.get(bytes([code]), f"0x{code:02x}")
                    raise Refused(f"unsupported pickle opcode {what} at byte {self.pos - 1} of data.pkl: only the opcodes "
                                  f"torch.save writes for a state dict (protocol 2) are read; nothing from the file was run")
                op()
        raise Refused("data.pkl ends before its STOP opcode (truncated)")

    def op_PROTO(self):
        protocol = self.unpack(_U1)
        # torch.save writes protocol 2; as in torch's reader a later protocol is refused at its
        # first opcode outside the list (FRAME, for protocol 4 and 5), not at PROTO.
        if not 2 <= protocol <= 5:
            raise Refused(f"unknown pickle protocol {protocol}")

    def op_GLOBAL(self):
        module, name = self.line(), self.line()
        value = self.globals.get((module, name))
        if value is None:
            hint = ""
            if module not in ("torch", "torch._utils", "collections"):
                hint = " (a pickled object other than a state dict; save model.state_dict() instead)"
            raise Refused(f"refused to load global {module}.{name}: only the torch tensor/state-dict globals are "
                          f"allowed{hint}; nothing from the file was run")
        self.push(value)

    def _put(self, index: int):
        if not self.stack:
            raise Refused(f"data.pkl memoizes from an empty stack (byte {self.pos})")
        if index not in self.memo and len(self.memo) >= MAX_MEMO:
            raise Refused(f"data.pkl memoizes more than {MAX_MEMO} objects")
        self.memo[index] = self.stack[-1]

    def _get(self, index: int):
        if index not in self.memo:
            raise Refused(f"data.pkl refers to memo entry {index}, which was never stored (byte {self.pos})")
        self.push(self.memo[index])

    def op_BINPUT(self):
        self._put(self.unpack(_U1))

    def op_LONG_BINPUT(self):
        self._put(self.unpack(_U4))

    def op_BINGET(self):
        self._get(self.unpack(_U1))

    def op_LONG_BINGET(self):
        self._get(self.unpack(_U4))

    def op_MARK(self):
        if len(self.marks) >= MAX_MARKS:
            raise Refused(f"data.pkl opens more than {MAX_MARKS} nested MARKs")
        self.marks.append(self.stack)
        self.marked += len(self.stack)
        self.stack = []

    def op_EMPTY_DICT(self):
        self.push({})

    def op_EMPTY_TUPLE(self):
        self.push(())

    def op_TUPLE(self):
        items = self.pop_mark()
        self.push(self.make_tuple(items))

    def _tuple_n(self, n: int):
        if len(self.stack) < n:
            raise Refused(f"TUPLE{n} at byte {self.pos - 1} of data.pkl with fewer than {n} values on the stack")
        items = self.stack[-n:]
        del self.stack[-n:]
        self.push(self.make_tuple(items))

    def op_TUPLE1(self):
        self._tuple_n(1)

    def op_TUPLE2(self):
        self._tuple_n(2)

    def op_TUPLE3(self):
        self._tuple_n(3)

    def op_BINUNICODE(self):
        raw = self.take(self.unpack(_U4))
        try:
            self.push(str(raw, "utf-8", "surrogatepass"))
        except UnicodeDecodeError:
            raise Refused(f"data.pkl holds a string that is not UTF-8 (before byte {self.pos})") from None

    def op_BININT(self):
        self.push(self.unpack(_I4))

    def op_BININT1(self):
        self.push(self.unpack(_U1))

    def op_BININT2(self):
        self.push(self.unpack(_U2))

    def op_LONG1(self):
        self.push(int.from_bytes(self.take(self.unpack(_U1)), "little", signed=True))

    def op_NONE(self):
        self.push(None)

    def op_NEWTRUE(self):
        self.push(True)

    def op_NEWFALSE(self):
        self.push(False)

    def op_BINPERSID(self):
        self.push(self.persistent_load(self.pop("a persistent id")))

    def op_REDUCE(self):
        args, func = self.pop("arguments"), self.pop("a callable")
        if type(args) is not tuple:
            raise Refused(f"REDUCE at byte {self.pos - 1} of data.pkl with {brief(args)} as arguments, not a tuple")
        if func is ORDERED_DICT:
            if args:
                raise Refused("collections.OrderedDict is called with arguments: only an empty one is read")
            self.push(StateDict())
        elif isinstance(func, Global):
            self.push(self.reduce(func, args))
        else:
            raise Refused(f"REDUCE at byte {self.pos - 1} of data.pkl calls {brief(func)}: only the allowed globals are called")

    def op_BUILD(self):
        state = self.pop("a state")
        if not self.stack or type(self.stack[-1]) is not StateDict:
            raise Refused(f"BUILD at byte {self.pos - 1} of data.pkl on something other than an OrderedDict")
        # torch.save(model.state_dict()) pickles the dict's `_metadata` attribute (per-module
        # version numbers). It carries no weights, so it is checked and dropped.
        if not isinstance(state, dict) or not set(state) <= {"_metadata"}:
            raise Refused("unexpected state for an OrderedDict: only _metadata may be attached")

    def op_SETITEM(self):
        value, key = self.pop(), self.pop()
        self.set_item(self.target_dict("SETITEM"), key, value)

    def op_SETITEMS(self):
        items = self.pop_mark()
        if len(items) % 2:
            raise Refused(f"SETITEMS at byte {self.pos - 1} of data.pkl with an odd number of values")
        target = self.target_dict("SETITEMS")
        for i in range(0, len(items), 2):
            self.set_item(target, items[i], items[i + 1])


def load(data, globals_: dict, persistent_load, reduce):
    """Runs the pickle `data` and returns its top-level object.

    Args:
      data: the pickle's bytes (copied once if given as a memoryview).
      globals_: (module, name) -> the `Global` marker that GLOBAL pushes; any other is refused.
      persistent_load: called with the object BINPERSID pops (a storage reference).
      reduce: called as `reduce(marker, args)` for REDUCE on a marker other than OrderedDict.

    Raises:
      Refused: an opcode, global, memo/stack/nesting use or structure outside the allow-lists;
        the message never contains the file's data, only descriptions of it.
    """
    return _Machine(bytes(data), globals_, persistent_load, reduce).run()
