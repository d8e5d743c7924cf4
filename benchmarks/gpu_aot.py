"""Deviceless ahead-of-time compilation of jlora's Llama training step for an NVIDIA H200 / H100.

No GPU is needed: jax's CUDA PJRT plugin builds a compile-only topology from a GpuTargetConfig
text proto (``jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...,
topology="1x1x1")``); the step (the same model, adapters, loss and ``jlora.train.make_step`` as
``benchmarks/llama_step.py``, preset issue16 by default) is traced on ``jax.ShapeDtypeStruct`` s
whose sharding lives on that topology's mesh, lowered and compiled by XLA's GPU compiler on the
host. Each variant runs in its own process (XLA_FLAGS are read once per process) and records:

  * whether it compiled (or the error), the trace / lower / compile times and the host RSS;
  * ``compiled.memory_analysis()``: argument, output, alias, temp, generated code; peak =
    argument + output - alias + temp (XLA's buffer assignment for one device);
  * FLOPs counted from the optimised HLO (``compiled.cost_analysis()`` is UNIMPLEMENTED for a
    compile-only GPU executable, and XLA's HloCostAnalysis counts a while body once and a cuBLAS
    custom call as 0): every ``dot`` (inside Triton / loop fusions) and ``__cublas$gemm`` /
    ``__cublas$lt$matmul`` custom call, times the trip counts of the loops around it, plus the
    cuDNN flash-attention custom calls (``__cudnn$fmha*``) from their Q / K shapes;
  * the custom-call targets and fusion kinds in the optimised HLO (cuDNN fused attention
    present or not), and for QLoRA where the NF4 dequantisation goes: fused into the GEMM
    (u8 codes inside the GEMM fusion) or a separate fusion writing a dense weight that a
    Triton GEMM fusion / cuBLAS custom call then reads, with HLO excerpts (forward, backward).

What a deviceless compile cannot know (read the numbers with this in mind): nothing is
autotuned (no device to time candidates on), so Triton GEMM fusions keep XLA's placeholder tile
config (16x8 output tiles, 2 warps, 1 stage: the executable is not one to time) and are never swapped for cuBLAS, which the autotuner does on a real GPU when cuBLAS is
faster (``--xla_gpu_cublas_fallback``); the cuDNN attention graphs are not built, so their
workspace is recorded as 0 bytes; cuBLAS workspaces are XLA's defaults.

Install (a separate venv; jlora itself comes from PYTHONPATH)::

    python3 -m venv /tmp/gpuaot     # a Python that jax 0.10.2 supports (3.11 was used)
    /tmp/gpuaot/bin/pip install jax==0.10.2 jaxlib==0.10.2 jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2 \\
        flax==0.12.8 optax==0.2.8 numpy==2.4.6 safetensors==0.8.0 chex==0.1.92 ml_dtypes==0.7.0
    # only for attention "cudnn": jax asks libcudnn for its version while tracing
    # jax.nn.dot_product_attention(implementation="cudnn"); no other CUDA library is needed
    /tmp/gpuaot/bin/pip install --no-deps nvidia-cudnn-cu12==9.28.0.42

Run (from the repository root)::

    PYTHONPATH=$PWD /tmp/gpuaot/bin/python benchmarks/gpu_aot.py                 # H200, all variants
    PYTHONPATH=$PWD /tmp/gpuaot/bin/python benchmarks/gpu_aot.py --target h100 --variants qlora-cudnn \\
        --dump-hlo /tmp/gpuaot_work/hlo
    PYTHONPATH=$PWD /tmp/gpuaot/bin/python benchmarks/gpu_aot.py --preset tiny --out /tmp/x.json   # seconds

Variants are ``<method>-<attention>[-notriton]``: method lora | dora | qlora, attention cudnn |
xla | explicit, ``-notriton`` adds ``--xla_gpu_enable_triton_gemm=false`` (GEMMs as cuBLAS custom
calls). The children run with ``JAX_PLATFORMS=cpu`` (jax's own backend is the host; the CUDA
plugin is loaded only to make the compile-only topology, so its CUDA-library version checks
are skipped and no CUDA runtime / driver is needed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TAG = "gpu_aot"
RESULT_MARK = "GPU_AOT_RESULT "

METHODS = ("lora", "dora", "qlora")
ATTENTIONS = ("cudnn", "xla", "explicit")
DEFAULT_VARIANTS = ("lora-cudnn", "lora-xla", "dora-cudnn", "dora-xla", "qlora-cudnn", "qlora-xla",
                    "lora-cudnn-notriton", "qlora-cudnn-notriton")

# GpuTargetConfig text protos (xla/stream_executor/device_description.proto, the layout of
# xla/tools/hlo_opt/gpu_specs/*.txtpb). The dnn / runtime versions are filled in from the flags.
_DEVICE_INFO = ("threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152 "
                "shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128 "
                "block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535 "
                "memory_bandwidth: {bw} l2_cache_size: 52428800 clock_rate_ghz: 1.98 device_memory_size: {mem} "
                "shared_memory_per_block_optin: 232448 cuda_compute_capability {{ major: 9 }} "
                "registers_per_core_limit: 65536 registers_per_block_limit: 65536")
TARGETS = {
    "h100": {"bw": 3352320000000, "mem": 84929347584, "name": "NVIDIA H100 80GB HBM3"},
    "h200": {"bw": 4800000000000, "mem": 150754820096, "name": "NVIDIA H200"},
}


def log(msg):
    print(f"[{TAG}] {msg}", flush=True)


def target_config(target, cudnn_version, cuda_version):
    t = TARGETS[target]
    dmaj, dmin = (int(x) for x in cudnn_version.split(".")[:2])
    cv = [int(x) for x in cuda_version.split(".")] + [0, 0]
    return ("gpu_device_info { " + _DEVICE_INFO.format(bw=t["bw"], mem=t["mem"]) + " }\n"
            'platform_name: "CUDA"\n'
            f"dnn_version_info {{ major: {dmaj} minor: {dmin} }}\n"
            f"runtime_version {{ major: {cv[0]} minor: {cv[1]} patch: {cv[2]} }}\n"
            f'device_description_str: "{t["name"]}"\n')


def parse_variant(v):
    parts = v.split("-")
    notriton = parts[-1] == "notriton"
    if notriton:
        parts = parts[:-1]
    if len(parts) != 2 or parts[0] not in METHODS or parts[1] not in ATTENTIONS:
        raise ValueError(f"variant {v!r}: expected <{'|'.join(METHODS)}>-<{'|'.join(ATTENTIONS)}>[-notriton]")
    return {"method": parts[0], "attention": parts[1], "triton_gemm": not notriton}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--target", choices=sorted(TARGETS), default="h200")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma list of <method>-<attention>[-notriton]")
    p.add_argument("--preset", default="issue16", help="a benchmarks/llama_step.py preset (issue16, cpu, tiny)")
    p.add_argument("--loss-chunk", type=int, default=256,
                   help="model.loss(..., chunk=N), as llama_step.py --loss-chunk (0: off)")
    p.add_argument("--remat", default=None, help="as llama_step.py --remat (true or a policy name)")
    p.add_argument("--no-scan", action="store_true", help="as llama_step.py --no-scan")
    p.add_argument("--dense-mask", action="store_true",
                   help="pass the batch's all-ones attention_mask to the model (default: None, as llama_step.py and "
                        "`jlora train` do when the mask cannot change the loss)")
    p.add_argument("--cudnn-version", default="9.8",
                   help="dnn_version_info of the target (jaxlib 0.10.2 is built against cuDNN 9.8)")
    p.add_argument("--cuda-version", default="12.9.0",
                   help="runtime_version of the target (jaxlib 0.10.2's CUDA 12 build: 12.9)")
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for every variant")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per variant's child process")
    p.add_argument("--dump-hlo", default=None, help="directory for each variant's optimised HLO text")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_aot_<target>.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is None:
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        for v in args.variants:
            try:
                parse_variant(v)
            except ValueError as e:
                p.error(str(e))
    return args


# ==========================================================================================
# HLO text analysis

_COMP_RE = re.compile(r"^(ENTRY )?%(\S+) \((.*)\) -> (.*) \{$")
_INSTR_RE = re.compile(r"^\s+(ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}


def _dims(shape):
    """'bf16[8,1024,2048]{2,1,0}' -> ('bf16', [8, 1024, 2048]); tuples -> the first element."""
    m = re.search(r"([a-z0-9]+)\[([\d,]*)\]", shape)
    if not m:
        return None, []
    return m.group(1), [int(d) for d in m.group(2).split(",") if d]


def _nbytes(shape):
    dt, d = _dims(shape)
    return int(math.prod(d) * _BYTES.get(dt, 4)) if dt else 0


def _short(line, keep_backend_kind=True, width=420):
    """One HLO line without its metadata / backend_config noise (the fusion kind kept)."""
    kind = re.search(r'"fusion_backend_config":\{"kind":"([^"]+)"', line)
    target = re.search(r'custom_call_target="([^"]+)"', line)
    s = re.sub(r", metadata=\{[^}]*\}", "", line)
    s = re.sub(r", backend_config=.*$", "", s)
    s = re.sub(r", operand_layout_constraints=\{.*?\}(?=, api_version)", "", s)
    s = re.sub(r", (frontend_attributes|sharding)=\{[^}]*\}", "", s)
    if keep_backend_kind and kind:
        s += f"  /* backend kind {kind.group(1)} */"
    if target and "custom_call_target" not in s:
        s += f'  /* custom_call_target="{target.group(1)}" */'
    s = s.rstrip()
    return s if len(s) <= width else s[:width] + " ..."


class Hlo:
    """The optimised HLO module's text, split into computations and instructions."""

    def __init__(self, text):
        self.text = text
        self.comps = {}        # name -> list of instruction dicts
        self.entry = None
        cur = None
        for line in text.splitlines():
            m = _COMP_RE.match(line)
            if m:
                cur = m.group(2)
                self.comps[cur] = []
                if m.group(1):
                    self.entry = cur
                continue
            if line.startswith("}"):
                cur = None
                continue
            if cur is None:
                continue
            mi = _INSTR_RE.match(line)
            if not mi:
                continue
            rest = mi.group(5)
            depth, i = 1, 0
            while i < len(rest) and depth:
                depth += {"(": 1, ")": -1}.get(rest[i], 0)
                i += 1
            operands = re.findall(r"%([\w.\-]+)", rest[:i - 1])
            attrs = rest[i:]
            calls = re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", attrs)
            br = re.search(r"branch_computations=\{([^}]*)\}", attrs)
            if br:
                calls += re.findall(r"%([\w.\-]+)", br.group(1))
            trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs)
            body = re.search(r"body=%([\w.\-]+)", attrs)
            op_name = re.search(r'op_name="([^"]*)"', attrs)
            self.comps[cur].append({
                "name": mi.group(2), "shape": mi.group(3), "op": mi.group(4), "operands": operands,
                "attrs": attrs, "calls": calls, "line": line, "root": bool(mi.group(1)),
                "trip": int(trip.group(1)) if trip else None, "body": body.group(1) if body else None,
                "kind": (re.search(r'"fusion_backend_config":\{"kind":"([^"]+)"', attrs) or [None, None])[1],
                "target": (re.search(r'custom_call_target="([^"]+)"', attrs) or [None, None])[1],
                "op_name": op_name.group(1) if op_name else "",
            })
        self.by_name = {c: {i["name"]: i for i in ins} for c, ins in self.comps.items()}
        self.mult = self._multipliers()

    def _multipliers(self):
        """How many times each computation runs per step (while bodies times their trip count)."""
        mult = {c: 0 for c in self.comps}
        if self.entry is None:
            return mult
        mult[self.entry] = 1
        order, seen = [], set()

        def visit(c):   # callers before callees
            if c in seen or c not in self.comps:
                return
            seen.add(c)
            for ins in self.comps[c]:
                for callee in ins["calls"]:
                    visit(callee)
            order.append(c)

        visit(self.entry)
        for c in reversed(order):
            for ins in self.comps[c]:
                for callee in ins["calls"]:
                    if callee not in mult:
                        continue
                    k = ins["trip"] if (ins["op"] == "while" and callee == ins["body"] and ins["trip"]) else 1
                    if ins["op"] == "while" and callee == ins["body"] and not ins["trip"]:
                        k = 1   # unknown trip count: counted once (flagged in unknown_trip_counts)
                    mult[callee] += mult[c] * k
        return mult

    def shape_of(self, comp, name):
        ins = self.by_name[comp].get(name)
        if ins is not None:
            return ins["shape"]
        return None

    def flops(self):
        """Dot / GEMM FLOPs (2 * M * N * K per product, times loop trips) and cuDNN attention."""
        out = {"dot_flops": 0, "cublas_flops": 0, "cudnn_fmha_fwd_flops": 0, "cudnn_fmha_bwd_flops": 0,
               "unknown_trip_counts": 0, "cudnn_fmha_calls": []}
        for c, ins_list in self.comps.items():
            m = self.mult.get(c, 0)
            for ins in ins_list:
                if ins["op"] == "while" and not ins["trip"]:
                    out["unknown_trip_counts"] += 1
                if not m:
                    continue
                if ins["op"] == "dot":
                    lhs = self.shape_of(c, ins["operands"][0])
                    _, ld = _dims(lhs or "")
                    _, od = _dims(ins["shape"])
                    cd = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins["attrs"])
                    k = math.prod(ld[int(i)] for i in cd.group(1).split(",") if i) if (cd and ld) else 0
                    out["dot_flops"] += m * 2 * math.prod(od) * k
                elif ins["op"] == "custom-call" and ins["target"] and ins["target"].startswith("__cublas"):
                    lhs = self.shape_of(c, ins["operands"][0])
                    _, ld = _dims(lhs or "")
                    _, od = _dims(ins["shape"])   # tuple: the first element is the product
                    cd = re.search(r'"lhs_contracting_dimensions":\["?([\d",]*)\]', ins["attrs"])
                    k = math.prod(ld[int(i.strip('"'))] for i in cd.group(1).split(",") if i.strip('"')) if (cd and ld) else 0
                    out["cublas_flops"] += m * 2 * math.prod(od) * k
                elif ins["op"] == "custom-call" and ins["target"] and ins["target"].startswith("__cudnn$fmha"):
                    # Q and K as the custom call's operand layout constraints give them: (B, T, N, H)
                    cons = ins["attrs"].split("operand_layout_constraints={", 1)
                    cons = cons[1].split("}, api_version")[0] if len(cons) == 2 else ""
                    shapes = re.findall(r"[a-z0-9]+\[[\d,]*\]", cons)
                    if len(shapes) < 2:
                        continue
                    _, q = _dims(shapes[0])
                    _, kk = _dims(shapes[1])
                    B, T, N, H = q
                    S = kk[1]
                    mask = (re.search(r'"mask_type":\s*"?([A-Z_]+)', ins["attrs"]) or [None, None])[1]
                    bwd = "Backward" in ins["target"]
                    # forward: QK^T and PV (4 B N T S H); backward: QK^T again, dV, dP, dQ, dK (10 B N T S H);
                    # dense count (a causal mask lets cuDNN skip about half)
                    f = (10 if bwd else 4) * B * N * T * S * H * m
                    out["cudnn_fmha_bwd_flops" if bwd else "cudnn_fmha_fwd_flops"] += f
                    out["cudnn_fmha_calls"].append({"target": ins["target"], "q_BTNH": q, "kv_seq": S,
                                                    "mask_type": mask, "runs_per_step": m, "dense_flops": f})
        out["total_flops"] = (out["dot_flops"] + out["cublas_flops"] + out["cudnn_fmha_fwd_flops"]
                              + out["cudnn_fmha_bwd_flops"])
        return out

    def census(self):
        targets, kinds = {}, {}
        for c, ins_list in self.comps.items():
            for ins in ins_list:
                if ins["op"] == "custom-call":
                    targets[ins["target"]] = targets.get(ins["target"], 0) + 1
                if ins["op"] == "fusion":
                    k = ins["kind"] or re.search(r"kind=(k\w+)", ins["attrs"]).group(1)
                    kinds[k] = kinds.get(k, 0) + 1
        return {"custom_call_targets": dict(sorted(targets.items())), "fusion_kinds": dict(sorted(kinds.items()))}

    def called_ops(self, comp, seen=None):
        """All instructions of ``comp`` and of the computations it calls (nested fusions)."""
        seen = set() if seen is None else seen
        if comp in seen or comp not in self.comps:
            return []
        seen.add(comp)
        out = list(self.comps[comp])
        for ins in self.comps[comp]:
            for callee in ins["calls"]:
                out += self.called_ops(callee, seen)
        return out

    def _is_gemm(self, ins):
        if ins["op"] == "custom-call" and ins["target"] and ("gemm" in ins["target"] or "matmul" in ins["target"]):
            return True
        if ins["op"] == "fusion" and ins["calls"]:
            return any(o["op"] == "dot" for o in self.called_ops(ins["calls"][0]))
        return False

    def _direction(self, comp, ins):
        """forward / backward from the instruction's op_name (jax names the backward pass
        ``transpose(jvp(...))``), else from the majority of its computation's op_names."""
        if ins["op_name"]:
            return "backward" if "transpose(" in ins["op_name"] else "forward"
        names = [o["op_name"] for o in self.comps[comp] if o["op_name"]]
        back = sum("transpose(" in n for n in names)
        return "backward" if names and back * 2 > len(names) else "forward"

    def qlora_dequant(self, max_examples=2):
        """Where the 4-bit dequantisation goes. A dequant producer: a non-GEMM fusion that reads u8 and
        writes a floating tensor of at least 2^12 elements with a gather / select inside (the NF4 or
        double-quant table lookup). Its consumers (through bitcast / copy / transpose) are GEMMs (a
        dense weight written to memory, then read by the GEMM) or not (``not_feeding_gemm``: the
        decoded f32 block scales); GEMM fusions with u8 parameters inside are dequant-fused GEMMs."""
        res = {"dequant_fusions": 0, "dequant_fusions_feeding_gemm": 0, "dequant_bytes_written_per_step": 0,
               "dequant_bytes_feeding_gemm_per_step": 0, "gemm_fusions_with_u8_inside": 0, "gemm_consumers": {},
               "not_feeding_gemm": [], "examples": {"forward": [], "backward": []}}
        for c, ins_list in self.comps.items():
            m = self.mult.get(c, 0)
            users = {}
            for ins in ins_list:
                for o in ins["operands"]:
                    users.setdefault(o, []).append(ins)
            for ins in ins_list:
                if ins["op"] != "fusion" or not ins["calls"]:
                    continue
                inner = self.called_ops(ins["calls"][0])
                has_u8 = any(o["op"] == "parameter" and o["shape"].startswith("u8[") for o in inner)
                if not has_u8:
                    continue
                if self._is_gemm(ins):
                    res["gemm_fusions_with_u8_inside"] += 1
                    continue
                dt, d = _dims(ins["shape"])
                if dt not in ("bf16", "f16", "f32") or math.prod(d or [0]) < 2 ** 12:
                    continue
                if not any(o["op"] in ("gather", "select") for o in inner):
                    continue
                res["dequant_fusions"] += 1
                res["dequant_bytes_written_per_step"] += m * _nbytes(ins["shape"])
                # follow bitcasts / copies / transposes to the consumers
                frontier, chain, gemms = [ins["name"]], [], []
                for _ in range(4):
                    nxt = []
                    for n in frontier:
                        for u in users.get(n, []):
                            if u["op"] in ("bitcast", "copy", "transpose", "reshape"):
                                chain.append(u)
                                nxt.append(u["name"])
                            elif self._is_gemm(u):
                                gemms.append(u)
                    frontier = nxt
                if gemms:
                    res["dequant_fusions_feeding_gemm"] += 1
                    res["dequant_bytes_feeding_gemm_per_step"] += m * _nbytes(ins["shape"])
                else:   # e.g. the double-quantised block scales decoded to f32 (then read by the weight's dequant)
                    res["not_feeding_gemm"].append({"fusion": ins["name"], "shape": ins["shape"], "runs_per_step": m,
                                                    "op_name_tail": ins["op_name"][-100:],
                                                    "users": [u["name"] for u in users.get(ins["name"], [])]})
                for g in gemms:
                    key = g["target"] or g["kind"] or "fusion"
                    res["gemm_consumers"][key] = res["gemm_consumers"].get(key, 0) + 1
                direction = self._direction(c, ins)
                if gemms and len(res["examples"][direction]) < max_examples:
                    ex = {"computation": c, "runs_per_step": m, "dequant_op_name": ins["op_name"],
                          "dequant_fusion": _short(ins["line"]),
                          "dequant_body": [_short(o["line"], width=260) for o in self.comps[ins["calls"][0]]
                                           if o["op"] in ("gather", "multiply", "convert", "select", "parameter")
                                           or o["root"]][-14:],
                          "between": [_short(b["line"]) for b in chain],
                          "gemm": [_short(g["line"]) for g in gemms]}
                    for g in gemms:
                        if g["op"] == "fusion":
                            ex.setdefault("gemm_body", []).extend(
                                _short(o["line"], width=300) for o in self.comps[g["calls"][0]])
                    res["examples"][direction].append(ex)
        return res

    def scan_carry_top(self, n=12):
        """The largest buffers carried by the while loops (the saved activations of a scanned model)."""
        best = []
        for c, ins_list in self.comps.items():
            for ins in ins_list:
                if ins["op"] != "while":
                    continue
                shapes = re.findall(r"[a-z0-9]+\[[\d,]*\]", ins["shape"])
                tot = sum(_nbytes(s) for s in shapes)
                best.append((tot, ins["name"], sorted(((_nbytes(s), s) for s in shapes), reverse=True)[:n]))
        best.sort(reverse=True)
        return [{"while": name, "carry_bytes": tot, "largest": [{"shape": s, "bytes": b} for b, s in top]}
                for tot, name, top in best[:3]]


# ==========================================================================================
# child: one variant

def emit(result):
    print(RESULT_MARK + json.dumps(result), flush=True)


def child(args):
    spec_v = json.loads(args.child)
    variant, preset, target = spec_v["variant"], spec_v["preset"], spec_v["target"]
    v = parse_variant(variant)
    out = {"variant": variant, **v, "status": "failed", "xla_flags": os.environ.get("XLA_FLAGS", "")}
    t_start = time.perf_counter()
    try:
        import jax
        import jax.numpy as jnp
        import optax
        from jax.experimental import topologies
        from jax.sharding import NamedSharding, PartitionSpec as P

        import jlora
        import jlora.train
        from jlora.models import llama
        sys.path.insert(0, HERE)
        import llama_step as ls

        out["import_s"] = time.perf_counter() - t_start
        t0 = time.perf_counter()
        topo = topologies.get_topology_desc(platform="cuda", target_config=spec_v["target_config"], topology="1x1x1")
        mesh = topologies.make_mesh(topo, (1,), ("x",))
        rep = NamedSharding(mesh, P())
        out["topology_s"] = time.perf_counter() - t0
        out["compile_device"] = repr(topo.devices[0])
        out["host_backend"] = jax.default_backend()

        argv = ["--preset", preset, "--dtype", "bfloat16", "--attention", v["attention"],
                "--loss-chunk", str(spec_v["loss_chunk"])]
        if spec_v.get("remat"):
            argv += ["--remat", spec_v["remat"]]
        if spec_v.get("no_scan"):
            argv += ["--no-scan"]
        cfg = ls.resolve(ls.parse_args(argv), {"jax_backend": "gpu"})
        out["config"] = cfg
        out["model_flops"] = ls.flop_count(cfg)
        config = ls.jlora_config(cfg)
        model = llama.LlamaForCausalLM(config)
        dt = getattr(jnp, cfg["dtype"])
        common = dict(rank=cfg["rank"], alpha=cfg["alpha"], targets=llama.DEFAULT_TARGETS["all-linear"])
        if v["method"] == "lora":
            spec = jlora.LoRA(**common)
        elif v["method"] == "dora":
            spec = jlora.DoRA(**common)
        else:   # as llama_step.py: NF4 + double quant, lm_head left in dtype
            spec = jlora.QLoRA(**common, quant="nf4", double_quant=True, compute_dtype=dt, quantize_frozen=None)
        out["spec"] = repr(spec)

        # the adapted, partitioned parameters as shapes only: init + apply (+ NF4 quantisation)
        # traced under eval_shape, nothing materialised
        def build(key):
            params = model.init_params(key)
            adapted = jlora.apply(params, spec, key=jax.random.fold_in(key, 1), model=model.apply,
                                  example=(jnp.zeros((1, 8), jnp.int32),))
            return jlora.partition(adapted)

        t0 = time.perf_counter()
        trainable, frozen = jax.eval_shape(build, jax.random.key(cfg["seed"]))
        optimizer = optax.adamw(cfg["lr"], b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg["weight_decay"])
        opt_state = jax.eval_shape(optimizer.init, trainable)
        place = lambda tree: jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), tree)
        trainable, frozen, opt_state = place(trainable), place(frozen), place(opt_state)
        B, S = cfg["batch"], cfg["seq"]
        batch = {k: jax.ShapeDtypeStruct((B, S), jnp.int32, sharding=rep)
                 for k in ("input_ids", "labels", "attention_mask")}
        nbytes = lambda tree: int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                                      for x in jax.tree_util.tree_leaves(tree)))
        out["trainable_bytes"], out["frozen_bytes"] = nbytes(trainable), nbytes(frozen)
        out["opt_state_bytes"], out["batch_bytes"] = nbytes(opt_state), nbytes(batch)
        out["trainable_params"] = int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(trainable)))
        out["abstract_build_s"] = time.perf_counter() - t0

        lifted = jlora.lift(model.apply, strict=True)
        chunk = cfg["jlora"]["loss_chunk"] or None

        dense_mask = spec_v.get("dense_mask", False)

        def loss_fn(p, b, key):   # as llama_step.py / `jlora train`: the all-ones mask is left out
            loss, n = lifted(p, b["input_ids"], b["labels"], b["attention_mask"] if dense_mask else None,
                             method="loss", chunk=chunk)
            return loss, {"n_tokens": n}

        step = jlora.train.make_step(loss_fn, optimizer)   # as llama_step.py: donated trainable / opt_state
        t0 = time.perf_counter()
        lowered = step.lower(trainable, frozen, opt_state, batch, None)
        out["trace_lower_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled = lowered.compile()
        out["compile_s"] = time.perf_counter() - t0

        ma = compiled.memory_analysis()
        mem = {k: int(getattr(ma, k + "_size_in_bytes")) for k in
               ("argument", "output", "alias", "temp", "generated_code")}
        mem["peak"] = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
        out["memory_analysis"] = mem
        out["memory_analysis_gib"] = {k: round(b / 2 ** 30, 4) for k, b in mem.items()}
        # jlora's planner on the same step (analytic; its coefficients were fitted on XLA:CPU)
        t0 = time.perf_counter()
        try:
            est = jlora.estimate(config, spec, batch=B, seq=S, optimizer=optimizer, param_dtype=dt, compute_dtype=dt,
                                 loss_chunk=chunk, backend="gpu")
            out["planner"] = {"peak_bytes": int(est.peak), "peak_gib": round(est.peak / 2 ** 30, 4),
                              "error_vs_gpu_compiled": round((est.peak - mem["peak"]) / mem["peak"], 4),
                              "parts_gib": {k: round(v / 2 ** 30, 4) for k, v in est.parts.items()},
                              "s": round(time.perf_counter() - t0, 1)}
        except Exception as e:  # noqa: BLE001
            out["planner"] = {"error": f"{type(e).__name__}: {e}"[:600]}
        try:
            ca = compiled.cost_analysis()
            out["xla_cost_analysis"] = None if ca is None else {k: float(x) for k, x in dict(ca).items()
                                                               if "flops" in k}
        except Exception as e:  # noqa: BLE001
            out["xla_cost_analysis"] = None
            out["xla_cost_analysis_error"] = repr(e)[:300]

        t0 = time.perf_counter()
        text = compiled.as_text()
        hlo = Hlo(text)
        out["hlo_chars"] = len(text)
        out["hlo_census"] = hlo.census()
        out["hlo_flops"] = hlo.flops()
        out["cudnn_fmha_custom_calls"] = {k: n for k, n in out["hlo_census"]["custom_call_targets"].items()
                                          if k.startswith("__cudnn$fmha")}
        out["cudnn_fmha_workspace_bytes"] = sorted({int(x) for x in re.findall(
            r'"cudnn_fmha_backend_config":\s*\{\s*"algorithm":\s*\{.*?"workspace_size":\s*"(\d+)"', text)})
        out["scan_carry_top"] = hlo.scan_carry_top()
        if v["method"] == "qlora":
            out["qlora_dequant"] = hlo.qlora_dequant()
        out["analysis_s"] = time.perf_counter() - t0
        if spec_v.get("dump_hlo"):
            os.makedirs(spec_v["dump_hlo"], exist_ok=True)
            path = os.path.join(spec_v["dump_hlo"], f"{target}_{preset}_{variant}.hlo.txt")
            with open(path, "w") as fh:
                fh.write(text)
            out["hlo_path"] = path
        out["status"] = "ok"
    except Exception as e:  # noqa: BLE001
        import traceback
        out["error"] = f"{type(e).__name__}: {e}"[:4000]
        out["traceback"] = traceback.format_exc()[-6000:]
    out["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["process_s"] = time.perf_counter() - t_start
    emit(out)


# ==========================================================================================
# parent

def _version(dist):
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:  # noqa: BLE001
        return None


def _code_info():
    """The jlora that was compiled: git commit, and whether jlora/ or llama_step.py had uncommitted changes."""
    try:
        git = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True, timeout=10,
                                        check=True).stdout.strip()
        return {"git_commit": git("rev-parse", "HEAD"),
                "uncommitted": git("status", "--porcelain", "--", "jlora", "benchmarks/llama_step.py").splitlines()}
    except (OSError, subprocess.SubprocessError):
        return {}


def run_variant(variant, args, tcfg):
    v = parse_variant(variant)
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"          # jax's backend: the host; the CUDA plugin only compiles
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    flags = [f for f in (args.xla_flags or "").split() if f]
    if not v["triton_gemm"]:
        flags.append("--xla_gpu_enable_triton_gemm=false")
    env["XLA_FLAGS"] = " ".join(flags)
    payload = {"variant": variant, "preset": args.preset, "target": args.target, "target_config": tcfg,
               "loss_chunk": args.loss_chunk, "remat": args.remat, "no_scan": args.no_scan,
               "dump_hlo": args.dump_hlo, "dense_mask": args.dense_mask}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(payload)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
        output, rc, timed_out = p.stdout + p.stderr, p.returncode, False
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, timed_out = None, True
    wall = time.perf_counter() - t0
    res = None
    for line in output.splitlines():
        if line.startswith(RESULT_MARK):
            res = json.loads(line[len(RESULT_MARK):])
    if res is None:
        res = {"variant": variant, **v, "status": "timeout" if timed_out else "crashed", "rc": rc,
               "output_tail": output[-4000:]}
    res["child_wall_s"] = wall
    return res


def main(argv=None):
    args = parse_args(argv)
    if args.child is not None:
        return child(args)
    tcfg = target_config(args.target, args.cudnn_version, args.cuda_version)
    out_path = args.out or os.path.join(HERE, "results", f"{TAG}_{args.target}.json")
    report = {
        "benchmark": TAG,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "benchmarks/gpu_aot.py", *sys.argv[1:]])
        if argv is None else None,
        "target": args.target, "target_config": tcfg, "topology": "1x1x1", "preset": args.preset,
        "loss_chunk": args.loss_chunk, "remat": args.remat, "scan_layers": not args.no_scan,
        "dense_mask": args.dense_mask,
        "xla_flags_common": args.xla_flags,
        "host": {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
                 **{"version_" + d.replace("-", "_"): _version(d) for d in
                    ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "nvidia-cudnn-cu12", "flax", "optax",
                     "numpy")}},
        "how": ("deviceless: get_topology_desc(platform='cuda', target_config=<GpuTargetConfig>, topology='1x1x1'), "
                "ShapeDtypeStructs on make_mesh(topo, (1,), ('x',)), jlora.train.make_step(...).lower(...).compile(); "
                "children run with JAX_PLATFORMS=cpu. No autotuning (no device): Triton GEMMs keep XLA's default "
                "tiles and are not swapped for cuBLAS; cuDNN attention workspaces are not sized (0)."),
        "peak_definition": "argument + output - alias + temp (XLA memory_analysis, one device)",
        "flops_definition": ("from the optimised HLO: 2*M*N*K of every dot and cuBLAS custom call times its loop "
                             "trips, plus cuDNN attention (forward 4*B*N*T*S*H, backward 10*B*N*T*S*H, dense: a "
                             "causal mask skips about half)"),
        "code": _code_info(),
        "results": {},
    }
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    for variant in args.variants:
        log(f"{variant}: compiling for {TARGETS[args.target]['name']} ({args.preset}) ...")
        res = run_variant(variant, args, tcfg)
        report["results"][variant] = res
        if res.get("status") == "ok":
            g = res["memory_analysis_gib"]
            fl = res["hlo_flops"]["total_flops"]
            extra = ""
            if "qlora_dequant" in res:
                q = res["qlora_dequant"]
                extra = (f"; dequant fusions {q['dequant_fusions']} (feeding a GEMM {q['dequant_fusions_feeding_gemm']}),"
                         f" GEMM fusions with u8 inside {q['gemm_fusions_with_u8_inside']}")
            log(f"{variant}: ok, compile {res['compile_s']:.1f} s; arg {g['argument']:.3f} out {g['output']:.3f} "
                f"alias {g['alias']:.3f} temp {g['temp']:.3f} peak {g['peak']:.3f} GiB; {fl / 1e12:.2f} TFLOP; "
                f"cuDNN fmha {res['cudnn_fmha_custom_calls'] or 'none'}{extra}")
        else:
            log(f"{variant}: {res.get('status')}: {(res.get('error') or res.get('output_tail') or '')[-600:]}")
        tmp = out_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(report, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, out_path)
    log(f"wrote {out_path}")
    return report


if __name__ == "__main__":
    main()
