r"""Per-device FLOPs and collectives of a compiled XLA program, from its text.

`hlo_stats(compiled.as_text(), num_devices)` walks the optimized HLO
module from ``ENTRY`` through every called computation (fusions, calls,
``while`` bodies, ``conditional`` branches) and returns

* ``dot_flops``: :math:`2 \cdot |\mathrm{result}| \cdot
  \prod \mathrm{contracting\ dims}` summed over every ``dot`` (convolutions
  counted the same way over their kernel window), i.e. the matmul FLOPs one
  device executes;
* ``collectives``: per kind (``all-gather``, ``reduce-scatter``,
  ``all-reduce``, ``all-to-all``, ``collective-permute``) the number of
  executions, their result bytes (``bytes``), the same at the *source*
  dtype (``src_bytes``, see below) and the ring-algorithm bytes each device
  sends (``wire_bytes``: all-gather :math:`S(n-1)/n` of the gathered size,
  reduce-scatter :math:`S(n-1)` of the scattered size, all-reduce
  :math:`2S(n-1)/n`, all-to-all :math:`S(n-1)/n`, permute :math:`S`; n the
  replica-group size), split in ``by_group`` by group size, ``"n"``, or
  ``"n/node"`` for a group of devices within one aligned block of 8 (an
  8-GPU node, `group_key`).

Loops are multiplied out: a ``while`` with XLA's ``known_trip_count``
counts its body that many times (``nn.scan`` over layers), one without it
(a decode loop that may stop early) `unknown_trip_count` times, reported in
``unknown_loops``. Of a ``conditional`` the costlier branch is counted.
(``compiled.cost_analysis()`` counts a loop body once, so it undercounts
scanned models by the number of layers.)

Source dtype: XLA:CPU has no bfloat16 matmuls, so it converts bfloat16
operands to float32 and may move that convert across a collective (an
all-gather of float32 copies of bfloat16 weights, an all-reduce of float32
gradients converted to bfloat16 right after). ``src_bytes`` counts such a
collective at 2 bytes per element: its operand is a pure convert from
bfloat16, or every user converts its result to bfloat16. That is what a
TPU/GPU program, which keeps bfloat16 end to end, would move.

>>> text = '''HloModule m
... %body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
...   %p = (s32[], f32[4,8]{1,0}) parameter(0)
...   %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
...   %w = f32[8,8]{1,0} all-gather(%x), replica_groups=[1,2]<=[2], dimensions={0}
...   %d = f32[4,8]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
...   ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %d)
... }
... ENTRY %main (a: f32[4,8]) -> f32[4,8] {
...   %a = f32[4,8]{1,0} parameter(0)
...   %w = (s32[], f32[4,8]) while(%t0), body=%body, backend_config={"known_trip_count":{"n":"3"}}
...   ROOT %r = f32[4,8]{1,0} get-tuple-element(%w), index=1
... }'''
>>> s = hlo_stats(text, 2)
>>> s["dot_flops"], s["collectives"]["all-gather"]["count"]
(1536.0, 3.0)
>>> s["collectives"]["all-gather"]["wire_bytes"]  # 3 x 256 B x (2-1)/2
384.0
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from typing import Dict, List, Optional, Tuple

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
         "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "token": 0}
_ARRAY = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_PASSTHROUGH = {"parameter", "convert", "bitcast", "copy", "reshape",
                "transpose", "tuple", "get-tuple-element", "broadcast"}


@dataclasses.dataclass
class Instr:
  name: str
  shape: str          # result shape text (array or tuple)
  opcode: str
  operands: List[str]
  attrs: str


def arrays(shape: str) -> List[Tuple[str, Tuple[int, ...]]]:
  """``[(dtype, dims), ...]`` of an array or tuple shape text."""
  out = []
  for dtype, dims in _ARRAY.findall(shape):
    if dtype in _DTYPE_BYTES:
      out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
  return out


def nbytes(shape: str, dtype_bytes: Optional[int] = None) -> int:
  return sum(math.prod(d) * (dtype_bytes or _DTYPE_BYTES[t])
             for t, d in arrays(shape))


def _split_shape(rest: str) -> Tuple[str, str]:
  """``'(f32[2], s32[]) while(...' -> ('(f32[2], s32[])', 'while(...')``."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  i = rest.find(" ")
  return rest[:i], rest[i + 1:]


def _parse_instr(line: str) -> Optional[Instr]:
  m = _NAME.match(line)
  if not m:
    return None
  shape, rest = _split_shape(line[m.end():])
  j = rest.find("(")
  if j < 0:
    return None
  opcode, depth = rest[:j].strip(), 0
  for k in range(j, len(rest)):
    depth += rest[k] == "("
    depth -= rest[k] == ")"
    if depth == 0:
      break
  operands = re.findall(r"%([\w.\-]+)", rest[j:k + 1])
  return Instr(m.group(1), shape, opcode, operands, rest[k + 1:])


def parse_module(text: str) -> Tuple[Dict[str, Dict[str, Instr]], str]:
  """``({computation: {instr name: Instr}}, entry name)``."""
  comps: Dict[str, Dict[str, Instr]] = {}
  entry, current = "", None
  for line in text.splitlines():
    h = _HEADER.match(line)
    if h and not line.startswith(" "):
      current = comps.setdefault(h.group(2), {})
      entry = h.group(2) if h.group(1) else entry
      continue
    if line.startswith("}"):
      current = None
      continue
    if current is not None:
      ins = _parse_instr(line)
      if ins is not None:
        current[ins.name] = ins
  return comps, entry


def first_group(attrs: str, num_devices: int) -> List[int]:
  """Device ids (positions in the program's device assignment, i.e. in the
  mesh's flattened order) of the first replica group of a collective."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*(?:,\s*device_ids="
                r"\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?\s*\{([^}]*)\}", attrs)
  if m:
    axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
    names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
    order = np.arange(math.prod(sizes))
    if m.group(2):  # the mesh's devices: an iota reshaped and transposed
      order = order.reshape([int(x) for x in m.group(2).split(",")])
      if m.group(3):
        order = order.transpose([int(x) for x in m.group(3).split(",")])
    order = order.reshape(sizes)
    chosen = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(4))]
    index = [0] * len(sizes)
    ids = []
    for coords in itertools.product(*[range(sizes[i]) for i in chosen]):
      for c, i in zip(coords, chosen):
        index[i] = c
      ids.append(int(order[tuple(index)]))
    return sorted(ids)
  m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\]"
                r"(?:T\(([\d,]+)\))?", attrs)
  if m:
    shape = [int(x) for x in m.group(1).split(",")]
    ids = np.arange(math.prod(shape)).reshape(
        [int(x) for x in m.group(2).split(",")])
    if m.group(3):
      ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    return sorted(int(i) for i in ids.reshape(shape[0], -1)[0])
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
  if m:
    return sorted(int(x) for x in m.group(1).split(","))
  if "source_target_pairs=" in attrs:
    pair = re.search(r"source_target_pairs=\{\{(\d+),(\d+)\}", attrs)
    return sorted(int(x) for x in pair.groups()) if pair else [0, 1]
  return list(range(num_devices))


def group_size(attrs: str, num_devices: int) -> int:
  """Devices per replica group of a collective's ``replica_groups=``."""
  return len(first_group(attrs, num_devices))


def group_key(ids: List[int], node: int = 8) -> str:
  """``"n"``, or ``"n/node"`` when the group lies within one aligned block
  of `node` consecutive devices (one 8-GPU node when the mesh puts its
  fastest axes there, as `make_mesh` does with ``'tensor'``)."""
  local = ids and ids[0] // node == ids[-1] // node
  return f"{len(ids)}/node" if local else f"{len(ids)}"


def _calls(ins: Instr) -> List[str]:
  names = re.findall(r"(?:calls|body|to_apply)=%([\w.\-]+)", ins.attrs)
  m = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
  if m:
    names += re.findall(r"%([\w.\-]+)", m.group(1))
  names += re.findall(r"(?:true|false)_computation=%([\w.\-]+)", ins.attrs)
  return names


_MOVES = _PASSTHROUGH | {"dynamic-slice", "dynamic-update-slice", "slice",
                         "concatenate", "pad", "constant", "iota"}


def _dtype(ins: Instr) -> str:
  a = arrays(ins.shape)
  return a[0][0] if len(a) == 1 else ""


def _scalar(ins: Instr) -> bool:
  """Index arithmetic inside a fusion (rank-0 results)."""
  a = arrays(ins.shape)
  return len(a) == 1 and not a[0][1]


class _Walker:
  """Totals per computation (memoized), loops multiplied out."""

  def __init__(self, comps, num_devices: int, unknown_trip_count: int):
    self.comps, self.n, self.unknown = comps, num_devices, unknown_trip_count
    self.memo: Dict[str, Dict[tuple, float]] = {}
    self.users: Dict[str, Dict[str, List[Instr]]] = {}
    self.unknown_loops = 0

  def _users(self, comp: str, name: str) -> List[Instr]:
    if comp not in self.users:
      idx: Dict[str, List[Instr]] = {}
      for ins in self.comps[comp].values():
        for op in ins.operands:
          idx.setdefault(op, []).append(ins)
      self.users[comp] = idx
    return self.users[comp].get(name, [])

  def _moves_only(self, ins: Instr) -> bool:
    """A convert / data-movement op or a fusion made only of them."""
    if ins.opcode != "fusion":
      return ins.opcode in _MOVES
    callee = self.comps.get((_calls(ins) or [""])[0], {})
    return bool(callee) and all(i.opcode in _MOVES or _scalar(i)
                                for i in callee.values())

  def _bf16_source(self, comp: str, operand: str) -> bool:
    ins = self.comps[comp].get(operand)
    if ins is None or not self._moves_only(ins):
      return False
    if ins.opcode == "fusion":  # bf16 in, or rounded through bf16
      callee = self.comps[_calls(ins)[0]]
      return any(_dtype(i) == "bf16" for i in callee.values())
    return any(_dtype(self.comps[comp][o]) == "bf16" for o in ins.operands
               if o in self.comps[comp])

  def _bf16_sink(self, comp: str, name: str, index: Optional[int]) -> bool:
    users = self._users(comp, name)
    if index is not None:
      users = [u for u in users if u.opcode == "get-tuple-element"
               and re.search(rf"index={index}\b", u.attrs)]
      users = [v for u in users for v in self._users(comp, u.name)]
    return bool(users) and all(_dtype(u) == "bf16" and self._moves_only(u)
                               for u in users)

  def _collective(self, comp: str, ins: Instr, out: Dict[tuple, float]):
    kind = ins.opcode.replace("-start", "")
    parts = arrays(ins.shape)
    if ins.opcode == "all-gather-start" and len(parts) > 1:
      parts = parts[len(parts) // 2:]
    ids = first_group(ins.attrs, self.n)
    n = len(ids)
    tup = len(parts) > 1
    size = src = 0.0
    for i, (dtype, dims) in enumerate(parts):
      b = math.prod(dims) * _DTYPE_BYTES[dtype]
      size += b
      op = ins.operands[i] if i < len(ins.operands) else ""
      narrow = dtype == "f32" and (self._bf16_source(comp, op) or
                                   self._bf16_sink(comp, ins.name,
                                                   i if tup else None))
      src += b / 2 if narrow else b
    factor = {"all-gather": (n - 1) / n, "reduce-scatter": n - 1,
              "all-reduce": 2 * (n - 1) / n, "all-to-all": (n - 1) / n,
              "collective-permute": 1.0}[kind]
    for key, v in (("count", 1.0), ("bytes", size), ("src_bytes", src),
                   ("wire_bytes", src * factor)):
      out[(kind, key)] = out.get((kind, key), 0.0) + v
    key = (kind, "wire", group_key(ids))
    out[key] = out.get(key, 0.0) + src * factor

  def _flops(self, comp: str, ins: Instr) -> float:
    result = sum(math.prod(d) for _, d in arrays(ins.shape))
    lhs = self.comps[comp].get(ins.operands[0]) if ins.operands else None
    if lhs is None:
      return 0.0
    dims = arrays(lhs.shape)[0][1]
    if ins.opcode == "dot":
      m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
      idx = [int(i) for i in m.group(1).split(",") if i] if m else []
      return 2.0 * result * math.prod(dims[i] for i in idx)
    rhs = arrays(self.comps[comp][ins.operands[1]].shape)[0][1]
    m = re.search(r"dim_labels=[^_]*_([^-]*)->", ins.attrs)
    out_feat = rhs[m.group(1).index("o")] if m and "o" in m.group(1) else 1
    return 2.0 * result * math.prod(rhs) / max(out_feat, 1)

  @staticmethod
  def _add(out, other, scale=1.0):
    for k, v in other.items():
      out[k] = out.get(k, 0.0) + scale * v

  def _loop(self, ins: Instr, out):
    m = re.search(r'known_trip_count"?:\{"n":"(\d+)"', ins.attrs)
    trips = int(m.group(1)) if m else self.unknown
    if not m:
      self.unknown_loops += 1
    for callee in _calls(ins):
      self._add(out, self.total(callee), trips)

  def total(self, comp: str) -> Dict[tuple, float]:
    if comp in self.memo:
      return self.memo[comp]
    out: Dict[tuple, float] = {}
    for ins in self.comps.get(comp, {}).values():
      if ins.opcode in ("dot", "convolution"):
        out[("flops",)] = out.get(("flops",), 0.0) + self._flops(comp, ins)
      elif ins.opcode.replace("-start", "") in KINDS:
        self._collective(comp, ins, out)
      if ins.opcode == "while":
        self._loop(ins, out)
      elif ins.opcode == "conditional":
        branches = [self.total(c) for c in _calls(ins)]
        if branches:
          self._add(out, max(branches, key=lambda b: (
              b.get(("flops",), 0.0), sum(v for k, v in b.items()
                                          if "wire_bytes" in k))))
      else:
        for callee in _calls(ins):
          if not ins.opcode.replace("-start", "") in KINDS:
            self._add(out, self.total(callee))
    self.memo[comp] = out
    return out


def hlo_stats(text: str, num_devices: int, *,
              unknown_trip_count: int = 1) -> dict:
  """Per-device matmul FLOPs and collectives of one HLO module (see the
  module docstring)."""
  comps, entry = parse_module(text)
  if not entry:
    raise ValueError("hlo_stats: no ENTRY computation in the HLO text")
  w = _Walker(comps, num_devices, unknown_trip_count)
  tot = w.total(entry)
  coll = {}
  for kind in KINDS:
    c = {k: tot.get((kind, k), 0.0) for k in ("count", "bytes", "src_bytes",
                                               "wire_bytes")}
    c["by_group"] = {k[2]: v for k, v in tot.items()
                     if k[0] == kind and len(k) == 3}
    coll[kind] = c
  return {"dot_flops": tot.get(("flops",), 0.0), "collectives": coll,
          "unknown_loops": w.unknown_loops,
          "unknown_trip_count": unknown_trip_count}


def f32_copies_of_bf16(text: str, min_bytes: int = 1 << 20) -> int:
  """Bytes of the float32 copies of bfloat16 arrays that the ENTRY
  computation makes (XLA:CPU upcasts bfloat16 weights before its float32
  matmuls; a TPU/GPU program has none), counting arrays >= `min_bytes`."""
  comps, entry = parse_module(text)
  w = _Walker(comps, 1, 1)
  total = 0
  for ins in comps.get(entry, {}).values():
    if (_dtype(ins) == "f32" and ins.opcode != "parameter"
        and nbytes(ins.shape) >= min_bytes
        and w._bf16_source(entry, ins.name)):  # pylint: disable=protected-access
      total += nbytes(ins.shape)
  return total
