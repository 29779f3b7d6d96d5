r"""On-paper step-time bounds and the markdown tables of `plan_scale`.

Published per-chip numbers (dense bfloat16 peak, HBM capacity and
bandwidth, interconnect bandwidth per direction):

* TPU v5p: 459 TFLOP/s, 95 GiB at 2,765 GB/s, ICI 1,200 GB/s bidirectional
  per chip (4,800 Gbps); https://cloud.google.com/tpu/docs/v5p
* TPU v5e: 197 TFLOP/s, 16 GiB at 819 GB/s, ICI 400 GB/s bidirectional per
  chip (1,600 Gbps); https://cloud.google.com/tpu/docs/v5e
* NVIDIA H100 SXM: 989 TFLOP/s (1,979 "with sparsity"), 80 GB HBM3 at
  3.35 TB/s, NVLink 900 GB/s bidirectional between the 8 GPUs of a node;
  https://www.nvidia.com/en-us/data-center/h100/ ; across nodes one
  400 Gb/s ConnectX-7 (InfiniBand NDR) port per GPU in a DGX H100
  (https://docs.nvidia.com/dgx/dgxh100-user-guide/introduction-to-dgxh100.html).

Lower bound of one step on a device (perfect overlap of compute, memory
traffic and communication; every term is itself optimistic):

.. math::
  t \ge \max\Big(\frac{F}{P},\ \frac{B_{hbm}}{W_{hbm}},\
  \sum_{c} \frac{w_c}{W_{link}(n_c)}\Big)

with F the matmul FLOPs per device from the compiled HLO (loops multiplied
out, remat recomputation included), P the peak, :math:`B_{hbm}` the bytes
that must cross HBM at least once (every argument read, every output
written, every all-gathered weight written and read back), :math:`w_c` the
ring-algorithm bytes a device sends for collective c over a group of
:math:`n_c` devices (source dtype, see `experiments.hlo_stats`) and
:math:`W_{link}` the per-direction bandwidth: 600 GB/s (v5p), 200 GB/s
(v5e), 450 GB/s NVLink for H100 groups inside one node (8 consecutive
devices of the mesh: the ``'tensor'`` axis of 8) and 50 GB/s (400 Gb/s
InfiniBand per GPU) for groups across nodes. Bound letters: F compute, M
HBM, N network. The MFU ceiling is the
model FLOPs (:math:`6N` per trained token, :math:`2N` per teacher token,
plus attention :math:`12 L H d_h T` / :math:`4 L H d_h T`; PaLM, Chowdhery
et al. 2022, App. B) over :math:`P \cdot t`.
"""

from __future__ import annotations

from typing import Dict, List

GIB = 2 ** 30

HARDWARE = {
    "v5p": {"name": "TPU v5p", "tflops": 459.0, "hbm_gib": 95.0,
            "hbm_gbs": 2765.0, "link_gbs": 600.0, "node": 0,
            "node_gbs": 600.0},
    "v5e": {"name": "TPU v5e", "tflops": 197.0, "hbm_gib": 16.0,
            "hbm_gbs": 819.0, "link_gbs": 200.0, "node": 0,
            "node_gbs": 200.0},
    "h100": {"name": "H100 SXM", "tflops": 989.0, "hbm_gib": 80.0,
             "hbm_gbs": 3350.0, "link_gbs": 50.0, "node": 8,
             "node_gbs": 450.0},
}


def link_gbs(hw: dict, group: str) -> float:
  """Per-direction bandwidth (GB/s) a device has in a replica group
  (`hlo_stats.group_key`: ``"n"``, or ``"n/node"`` within one 8-device
  block: NVLink on H100)."""
  if hw["node"] and str(group).endswith("/node"):
    return hw["node_gbs"]
  return hw["link_gbs"]


def peak_bytes(r: dict) -> int:
  """XLA's per-device peak estimate: arguments + outputs - aliased + temp."""
  m = r["memory"]
  return m["argument"] + m["output"] - m["alias"] + m["temp"]


def adjusted_peak(r: dict) -> int:
  """`peak_bytes` with XLA:CPU's float32 copies of bfloat16 arrays (the
  stacked attention probabilities before the backward pass, gathered
  weights, ...) counted at bfloat16 size: a bfloat16-native backend holds
  at most the bfloat16 array in their place. Never below the arguments and
  outputs. An estimate: the copies need not all be live at the peak."""
  m = r["memory"]
  floor = m["argument"] + m["output"] - m["alias"]
  return max(peak_bytes(r) - r.get("f32_copies", 0) // 2, floor)


def bounds(r: dict, hw: dict) -> Dict[str, float]:
  """Seconds: compute, hbm, comm, the bound (max) and the MFU ceiling."""
  flops = r["hlo"]["dot_flops"]
  compute = flops / (hw["tflops"] * 1e12)
  hbm = r["hbm_bytes"] / (hw["hbm_gbs"] * 1e9)
  comm = 0.0
  for c in r["hlo"]["collectives"].values():
    for group, wire in c["by_group"].items():
      comm += wire / (link_gbs(hw, group) * 1e9)
  t = max(compute, hbm, comm)
  model = r["model_flops_per_device"]
  mfu = model / (hw["tflops"] * 1e12 * t) if t else 0.0
  which = max((("compute", compute), ("HBM", hbm), ("comm", comm)),
              key=lambda kv: kv[1])[0]
  return {"compute_s": compute, "hbm_s": hbm, "comm_s": comm, "step_s": t,
          "mfu": mfu, "bound_by": which}


_SHORT = {"compute": "F", "HBM": "M", "comm": "N"}


def _gib(n: float) -> str:
  return f"{n / GIB:.2f}" if n < 10 * GIB else f"{n / GIB:.1f}"


def _fits(r: dict) -> str:
  """yes: XLA:CPU's peak fits; yes*: only with its f32 copies at bf16
  size (`adjusted_peak`); no."""
  p, q = peak_bytes(r), adjusted_peak(r)
  return "/".join("yes" if p <= hw["hbm_gib"] * GIB else
                  "yes*" if q <= hw["hbm_gib"] * GIB else "no"
                  for hw in HARDWARE.values())


def _coll(r: dict) -> str:
  c = r["hlo"]["collectives"]
  ag = c["all-gather"]["src_bytes"]
  red = c["all-reduce"]["src_bytes"] + c["reduce-scatter"]["src_bytes"]
  other = c["all-to-all"]["src_bytes"] + c["collective-permute"]["src_bytes"]
  s = f"{_gib(ag)} / {_gib(red)}"
  return s + (f" / {_gib(other)}" if other else "")


def _time(r: dict, key: str) -> str:
  b = bounds(r, HARDWARE[key])
  return f"{b['step_s']:.2f} ({_SHORT[b['bound_by']]}, {100 * b['mfu']:.0f}%)"


DISTILL_HEAD = (
    "| pair | devices | mesh | teacher | remat | batch | state | teacher "
    "| temp | peak (f32 copies as bf16) | fits v5p/v5e/H100 | all-gather / "
    "all-reduce GiB | v5p s (bound, MFU) | v5e s | H100 s | compile s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def distill_line(r: dict) -> str:
  row, m = r["row"], r["memory"]
  mesh = "x".join(f"{k[0]}{v}" for k, v in r["mesh"].items() if v > 1)
  return (f"| {row['pair']} | {row['devices']} | {mesh} | "
          f"{row['placement']} | {'on' if row['remat'] else 'off'} | "
          f"{row['batch']} | {_gib(r['state_bytes'])} | "
          f"{_gib(r['teacher_bytes'])} | {_gib(m['temp'])} | "
          f"{_gib(peak_bytes(r))} ({_gib(adjusted_peak(r))}) | {_fits(r)} | "
          f"{_coll(r)} | "
          f"{_time(r, 'v5p')} | {_time(r, 'v5e')} | {_time(r, 'h100')} | "
          f"{r['compile_s']:.0f} |")


GENERATE_HEAD = (
    "| student | devices | mesh | student weights | batch | prompt + new "
    "| params | temp (KV cache, ...) | peak (f32 copies as bf16) | "
    "fits v5p/v5e/H100 | "
    "all-gather GiB | v5p s (bound) | v5e s | H100 s | compile s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def generate_line(r: dict) -> str:
  row, m = r["row"], r["memory"]
  mesh = "x".join(f"{k[0]}{v}" for k, v in r["mesh"].items() if v > 1)
  times = []
  for key in HARDWARE:
    b = bounds(r, HARDWARE[key])
    times.append(f"{b['step_s']:.1f} ({_SHORT[b['bound_by']]})")
  ag = r["hlo"]["collectives"]["all-gather"]["src_bytes"]
  return (f"| {row['student']} | {row['devices']} | {mesh} | "
          f"{row['placement']} | {row['batch']} | "
          f"{row['prompt']} + {row['new_tokens']} | "
          f"{_gib(r['state_bytes'])} | {_gib(m['temp'])} | "
          f"{_gib(peak_bytes(r))} ({_gib(adjusted_peak(r))}) | {_fits(r)} | "
          f"{_gib(ag)} | "
          f"{' | '.join(times)} | {r['compile_s']:.0f} |")


_PAIRS = {"8b-1b": 0, "70b-8b": 1}
_MESHES = {"fsdp": 0, "fsdp_tensor": 1, "data_fsdp": 2}
_PLACES = {"replicated": 0, "fsdp": 1, "tensor": 2, "fsdp_tensor": 3,
           "state": 0, "gather": 1}


def _sort_key(r: dict):
  row = r["row"]
  return (row["program"], _PAIRS.get(row.get("pair"), 9),
          row.get("student", ""), row["devices"], _MESHES[row["mesh"]],
          _PLACES.get(row["placement"], 9), not row.get("remat", False),
          row["batch"], not row["scan"])


def _distill_sections(dist: List[dict]) -> List[str]:
  main = [r for r in dist if r["row"]["scan"]
          and r["row"]["batch"] == r["row"]["devices"]]
  sweep = [r for r in dist if r["row"]["scan"] and r["row"]["mesh"] == "fsdp"
           and r["row"]["placement"] == "fsdp" and r["row"]["remat"]]
  unrolled = [r for r in dist if not r["row"]["scan"]]
  twins = [r for r in main if any(
      dict(u["row"], scan=True) == r["row"] for u in unrolled)]
  out = ["Distillation step (token KD, fused head loss), one sequence of "
         "4,096 tokens per device (batch = devices). Bytes per device in "
         "GiB; mesh `f8xt8` = `{fsdp: 8, tensor: 8}`, `d4xf16` = `{data: 4, "
         "fsdp: 16}`; fits: `yes` = XLA:CPU's peak fits the HBM, `yes*` = "
         "only with its float32 copies counted at bf16 size; per "
         "accelerator the step-time lower bound in seconds, what bounds it "
         "(F compute, M HBM, N network) and the MFU ceiling.", "",
         DISTILL_HEAD] + [distill_line(r) for r in main] + [""]
  if sweep:
    out += ["Batch sweep (`{fsdp: N}`, teacher FSDP, remat on):", "",
            DISTILL_HEAD] + [distill_line(r) for r in sweep] + [""]
  if unrolled:
    out += ["Layers unrolled (`scan_layers=False`) next to the scanned "
            "step:", "", DISTILL_HEAD]
    out += [distill_line(r) for r in sorted(twins + unrolled,
                                            key=_sort_key)] + [""]
  return out


def tables(results: List[dict]) -> str:
  """The markdown tables of a list of results (failed rows listed)."""
  ok = sorted((r for r in results if "error" not in r), key=_sort_key)
  dist = [r for r in ok if r["row"]["program"] == "distill"]
  gen = [r for r in ok if r["row"]["program"] == "generate"]
  out = _distill_sections(dist) if dist else []
  if gen:
    out += ["On-policy generation (KV cache, `make_generate_fn`, sampling "
            "at temperature 0.9).", "", GENERATE_HEAD]
    out += [generate_line(r) for r in gen] + [""]
  out += compile_summary(ok)
  bad = [r for r in results if "error" in r]
  for r in bad:
    out.append(f"* not compiled: `{r['key']}`: {r['error']}")
  return "\n".join(out)


def compile_summary(ok: List[dict]) -> List[str]:
  """Compile seconds per program x model x devices x scan (median, max)."""
  groups: Dict[tuple, List[float]] = {}
  for r in ok:
    row = r["row"]
    name = row.get("pair") or row.get("student")
    key = (row["program"], name, row["devices"],
           "scanned" if row["scan"] else "unrolled")
    groups.setdefault(key, []).append(r["compile_s"])
  if not groups:
    return []
  out = ["Compile time on this machine (seconds; lowering excluded):", "",
         "| program | model(s) | devices | layers | rows | median | max |",
         "|---|---|---|---|---|---|---|"]
  for key in sorted(groups):
    v = sorted(groups[key])
    out.append(f"| {' | '.join(str(k) for k in key)} | {len(v)} | "
               f"{v[len(v) // 2]:.0f} | {v[-1]:.0f} |")
  return out + [""]
