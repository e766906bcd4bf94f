"""What an optimized XLA program launches: kernels by kind, the bytes they move, collectives.

`program_stats(hlo_text)` reads the text of a compiled executable (`compiled.as_text()`) and
counts, over the entry computation and the computations it runs through `while`,
`conditional` and `call` (each once: a loop body is not multiplied by its trip count),
every instruction that is a kernel launch (a fusion, a library
call such as a cuDNN convolution or a cuBLAS GEMM, a copy, a collective, an unfused op);
free instructions (parameters, constants, tuples, bitcasts, control flow) are not kernels.
Bytes per kernel are its operands plus its results, the shapes as printed: an upper bound of
what a kernel reads from and writes to device memory (a kernel that reads a slice of an
operand reads less; a fusion's inputs are read once however often it uses them). A second,
tighter figure (`sliced_bytes`) counts of a fusion's operand only the elements that the fused
computation keeps through its elementwise ops and slices (a loop fusion computes only
those): DenseNet's backward pass sums, for every part of a dense
block's concatenation, slices of each later layer's input gradient, which the upper bound
counts in full once per part.
Kernels are also counted by the part of the step they belong to (`phase`), read from the
op name JAX records on each instruction: the differentiated forward pass (`jvp(...)`), the
backward pass (`transpose(jvp(...))`) and the rest (no gradient: a forward pass whose
gradient is not taken, the optimizer), each by the top-level Flax module the op is in.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

# Bytes per element of XLA's primitive types.
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "token": 0}
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
         "conditional", "call", "after-all", "partition-id", "replica-id", "opt-barrier",
         "add-dependency", "domain"}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute", "collective-broadcast")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
# The first scope after `jit(<name>)/` in an op name, e.g. `vmap(transpose(jvp(Module)))`.
_SCOPE = re.compile(r'op_name="[^"/;]*/([^"/;]*)')


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape such as `f32[64,128]{1,0}` or a tuple of them."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype not in _DTYPE_BYTES:
            continue
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += count * _DTYPE_BYTES[dtype]
    return total


@dataclasses.dataclass
class ProgramStats:
    """kernels: launches by kind; hbm_bytes: operands + results of all kernels (upper bound);
    sliced_bytes: the same with a fusion's operands counted as far as its slices read them;
    collectives: collective ops by kind; collective_bytes_by_kind: their results' bytes;
    kernels_by_phase: launches by `phase`."""

    kernels: collections.Counter
    hbm_bytes: float
    sliced_bytes: float
    collectives: collections.Counter
    collective_bytes_by_kind: collections.Counter
    kernels_by_phase: collections.Counter

    @property
    def num_kernels(self) -> int:
        return sum(self.kernels.values())


def _computations(text: str) -> dict[str, list[str]]:
    """{computation name: its instruction lines}, and '__entry__' -> the entry's name."""
    out, name, entry = {}, None, None
    for line in text.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            name = match.group(2)
            out[name] = []
            if match.group(1):
                entry = name
        elif name is not None and line.strip() == "}":
            name = None
        elif name is not None:
            out[name].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    out["__entry__"] = [entry]
    return out


def _kind(name: str, opcode: str, rest: str) -> str:
    """A kernel's kind: a fusion's name without numeric suffixes (`loop_add_fusion.3` ->
    `loop_add_fusion`), a custom call's target (`__cudnn$convForward`), else the opcode."""
    if opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', rest)
        return target.group(1) if target else "custom-call"
    if opcode == "fusion":
        return re.sub(r"(\.\d+|_\d+)+$", "", name)
    return opcode


def phase(rest: str) -> str:
    """The part of a differentiated program an instruction (the text after its opcode)
    belongs to, from its op name: 'forward <Module>' (inside `jvp`), 'backward <Module>'
    (inside `transpose(jvp(...))`) or 'no gradient <Module>', also under other
    transformations such as `vmap`; the module is the top-level Flax module the op is in,
    '-' for none (e.g. the optimizer's updates)."""
    match = _SCOPE.search(rest)
    scope = match.group(1) if match else ""
    stage = ("backward" if "transpose(" in scope else "forward" if "jvp(" in scope
             else "no gradient")
    module = re.sub(r"^(\w+\()*", "", scope).rstrip(")")
    return f"{stage} {module if module[:1].isupper() else '-'}"


# Ops that compute each output element from the same element of their operands (a loop
# fusion computes only the elements a later slice keeps).
_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "select",
                "convert", "bitcast", "copy", "negate", "exponential", "log", "compare", "and",
                "or", "not", "abs", "sqrt", "rsqrt", "tanh", "power", "clamp"}


def _elements(shape: str) -> int:
    match = _ARRAY.search(shape)
    return math.prod(int(d) for d in filter(None, match.group(2).split(","))) if match else 0


def _parameter_fractions(lines: list[str]) -> dict[int, float]:
    """{parameter number: the fraction of its elements a fused computation reads}: below 1
    where every path from the parameter goes through elementwise ops into a `slice`."""
    numbers, shapes, users = {}, {}, collections.defaultdict(list)
    order = []
    for line in lines:
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode, rest = match.groups()
        shapes[name] = shape
        order.append(name)
        if opcode == "parameter":
            numbers[name] = int(rest.split(")", 1)[0])
            continue
        for operand in re.findall(r"%([\w.-]+)", rest.split(")", 1)[0]):
            users[operand].append((name, opcode))
    fraction = {}
    for name in reversed(order):  # users before their operands
        needed = []
        for user, opcode in users[name] or [(None, None)]:
            if user is None:  # the fusion's result
                needed.append(1.0)
            elif opcode == "slice":
                size = _elements(shapes[name])
                needed.append(fraction[user] * _elements(shapes[user]) / size if size else 1.0)
            elif opcode in _ELEMENTWISE and _elements(shapes[user]) == _elements(shapes[name]):
                needed.append(fraction[user])
            else:
                needed.append(1.0)
        fraction[name] = min(1.0, max(needed))
    return {number: fraction[name] for name, number in numbers.items()}


def program_stats(text: str) -> ProgramStats:
    """The kernels, bytes and collectives of one optimized HLO module (`compiled.as_text()`)."""
    computations = _computations(text)
    kernels, collectives, collective_bytes, phases = (
        collections.Counter(), collections.Counter(), collections.Counter(),
        collections.Counter())
    hbm = sliced = 0.0
    pending, seen = [computations["__entry__"][0]], set()
    while pending:
        computation = pending.pop()
        if computation in seen:
            continue
        seen.add(computation)
        shapes = {}
        for line in computations[computation]:
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            name, shape, opcode, rest = match.groups()
            shapes[name] = shape
            if opcode in ("while", "conditional", "call"):
                # the computations it runs: every %name after the operand list
                pending += re.findall(r"%([\w.-]+)", rest.split(")", 1)[-1])
            collective = opcode.removesuffix("-start").removesuffix("-done")
            if collective in _COLLECTIVES and not opcode.endswith("-start"):
                # the result's bytes: a synchronous op's, or an asynchronous one's `-done`
                # (its `-start` may return its operands and results together)
                collectives[collective] += 1
                collective_bytes[collective] += shape_bytes(shape)
            if opcode in _FREE or opcode.endswith("-done"):
                continue
            operands = re.findall(r"%([\w.-]+)", rest.split(")", 1)[0])
            sizes = [shape_bytes(shapes.get(o, "")) for o in operands]
            kernels[_kind(name, opcode, rest)] += 1
            phases[phase(rest)] += 1
            hbm += shape_bytes(shape) + sum(sizes)
            fused = re.search(r"calls=%([\w.-]+)", rest) if opcode == "fusion" else None
            read = _parameter_fractions(computations.get(fused.group(1), [])) if fused else {}
            sliced += shape_bytes(shape) + sum(size * read.get(i, 1.0)
                                               for i, size in enumerate(sizes))
    return ProgramStats(kernels, hbm, sliced, collectives, collective_bytes, phases)
