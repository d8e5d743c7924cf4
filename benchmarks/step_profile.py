"""Where a training step's time goes, in the same categories for jlora (XLA) and PEFT (PyTorch).

Used by ``llama_step.py --profile N``: after the timed steps each child runs N more steps under its
framework's profiler and attributes the time of every executed op to one category:

  head matmul        the vocabulary projection (and its backward): a matmul with the vocab dimension
  layer matmuls      every other matmul: base projections and LoRA factors, forward and backward
  attention core     scores, mask, softmax, PV (jlora: the ops under ``self_attn`` that are not a
                     projection; torch: ``scaled_dot_product_attention`` and its backward)
  loss               log-softmax / cross-entropy over the logits and its backward (non-matmul)
  elementwise        norms, RoPE, SiLU, residual adds, LoRA scaling, reductions (non-matmul, in the model)
  layout copies      copies and transposes (XLA fusions whose root is a copy / transpose; torch's
                     ``copy_``, ``clone``, ``cat``, ...), which XLA often fuses with elementwise math
  optimizer          AdamW and the step's bookkeeping (jlora: ops outside the differentiated function;
                     torch: everything under ``optimizer.step()`` / ``zero_grad``)
  other              what none of the above matched

jlora: ``jax.profiler.trace`` writes a Perfetto trace; XLA:CPU (and GPU) record one event per
executed HLO instruction (thunk / kernel) named after it. Each name is looked up in the compiled
program's HLO text (``compiled.as_text()``, parsed by ``gpu_aot.Hlo``), where the instruction's ``op_name`` metadata carries
jlora's module path (``.../layers/self_attn/q_proj/dot_general``; ``jlora.lift`` keeps the name
stack) and its fused computation shows whether it contains a ``dot``. torch: ``torch.profiler`` with
``record_shapes``, by each op's self time.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

CATEGORIES = ("head matmul", "layer matmuls", "attention core", "loss", "elementwise", "layout copies",
              "optimizer", "other")

_PARENTS = ("while", "conditional", "call", "async-start", "async-done")
_PROJ = re.compile(r"/(q|k|v|o|gate|up|down)_proj/")


def index_hlo(text):
    """{instruction name: instruction} over every computation of an optimised HLO module, and the
    parsed module (:class:`gpu_aot.Hlo`, which this shares with the deviceless GPU compile)."""
    from gpu_aot import Hlo

    hlo = Hlo(text)
    return {i["name"]: i for ins in hlo.comps.values() for i in ins}, hlo


def _contains(hlo, ins, opcodes):
    """Does a computation ``ins`` calls (or one nested in it) hold an instruction with one of ``opcodes``?"""
    return any(o["op"] in opcodes for c in ins["calls"] for o in hlo.called_ops(c))


def _root_opcode(hlo, comp):
    roots = [i["op"] for i in hlo.comps.get(comp, ()) if i["root"]]
    return roots[0] if roots else None


def classify_hlo(name, instrs, hlo, vocab):
    """The category of one executed HLO instruction (see the module docstring)."""
    i = instrs.get(name)
    if i is None:
        return None
    if i["op"] in _PARENTS:   # a loop / call whose body's instructions have events of their own
        return "parent"
    op, opcode = i["op_name"], i["op"]
    matmul = opcode in ("dot", "convolution") or (
        opcode in ("fusion", "custom-call") and _contains(hlo, i, {"dot", "convolution"}))
    if opcode == "custom-call" and re.search(r"gemm|matmul|cublas", name + op, re.I):
        matmul = True
    in_grad = "jvp(" in op or "transpose(" in op
    if matmul:
        if _PROJ.search(op) or ("/layers/" in op and "self_attn" not in op):
            return "layer matmuls"
        if "self_attn" in op:
            return "attention core"
        return "head matmul" if re.search(rf"\b{vocab}\b", i["shape"]) or "/layers/" not in op else "layer matmuls"
    root = _root_opcode(hlo, i["calls"][0]) if i["calls"] else opcode
    if opcode in ("copy", "transpose") or root in ("copy", "transpose") or name.startswith(("copy", "transpose")):
        return "layout copies"
    if not in_grad:
        return "optimizer"
    if "self_attn" in op and not _PROJ.search(op):
        return "attention core"
    if "/model/" in op or "/layers/" in op:
        return "elementwise"
    if "loss" in op:
        return "loss"
    return "other"


def _trace_events(trace_dir):
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(files[-1], "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def _add(per_op, key, cat, us, detail):
    """Accumulates one event's time under ``key`` (its category and detail from the first event)."""
    cat, total, detail = per_op.get(key, (cat, 0.0, detail))
    per_op[key] = (cat, total + us, detail)


def summarise(per_op, n_steps, step_ms, top):
    """per_op: {name: (category, total_us, detail)} -> the JSON block."""
    cats = collections.Counter()
    for cat, us, _ in per_op.values():
        cats[cat] += us
    attributed = sum(cats.values()) / 1e3 / n_steps
    rows = sorted(per_op.items(), key=lambda kv: -kv[1][1])[:top]
    return {"steps_profiled": n_steps,
            "ms_per_step": {c: round(cats[c] / 1e3 / n_steps, 3) for c in CATEGORIES},
            "attributed_ms_per_step": round(attributed, 3),
            "step_ms_median": round(step_ms, 3) if step_ms else None,
            "note": "op time summed over threads can exceed the step's wall time; the gap below it is "
                    "dispatch, waiting and ops no category saw",
            "top_ops": [{"name": k, "category": c, "ms_per_step": round(us / 1e3 / n_steps, 3), "detail": d}
                        for k, (c, us, d) in rows]}


def jax_profile(run_step, n_steps, hlo_text, trace_dir, vocab, step_ms=None, top=25):
    """Profile ``n_steps`` calls of ``run_step()`` (each blocks until done) with jax's profiler."""
    import jax

    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(n_steps):
            run_step()
    instrs, hlo = index_hlo(hlo_text)
    per_op, cats = {}, {}
    unmatched = collections.Counter()
    for e in _trace_events(trace_dir):
        if e.get("ph") != "X":
            continue
        name = e.get("name", "")
        if name not in cats:   # an instruction runs once per step per loop trip: classify it once
            cats[name] = classify_hlo(name, instrs, hlo, vocab)
        cat = cats[name]
        if cat == "parent":
            continue
        if cat is None:
            if name.startswith(("$", "ThunkExecutor", "PjitFunction", "Slinky", "Common", "end:")):
                continue   # Python frames, the executor's own spans, thread-pool waits
            unmatched[name] += e.get("dur", 0)
            continue
        _add(per_op, name, cat, e.get("dur", 0), instrs[name]["op_name"])
    out = summarise(per_op, n_steps, step_ms, top)
    out["unmatched_events_ms_per_step"] = {k: round(v / 1e3 / n_steps, 3) for k, v in unmatched.most_common(8)}
    out["profiler"] = "jax.profiler.trace (per-HLO-instruction events), names looked up in compiled.as_text()"
    return out


_TORCH_RULES = (
    ("attention core", re.compile(r"scaled_dot_product|flash_attention|efficient_attention|_softmax_backward|"
                                  r"aten::softmax|aten::_softmax")),
    ("loss", re.compile(r"log_softmax|nll_loss|cross_entropy")),
    ("layer matmuls", re.compile(r"aten::(mm|addmm|bmm|matmul|linear|baddbmm)$")),
    ("layout copies", re.compile(r"aten::(copy_|clone|contiguous|_to_copy|to|cat|transpose|t|permute|"
                                 r"reshape|view|expand|_unsafe_view|as_strided|index_select|embedding.*)$")),
    ("elementwise", re.compile(r"aten::")),
)


def torch_profile(run_step, n_steps, vocab, step_ms=None, top=25):
    """Profile ``n_steps`` calls of ``run_step()`` with torch.profiler; ``run_step`` should wrap its
    optimizer update in ``torch.profiler.record_function("optimizer")``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(n_steps):
            run_step()
    # every op inside an "optimizer" range counts as optimizer time, whatever it is
    events = prof.events()
    opt_ranges = [(e.time_range.start, e.time_range.end) for e in events if e.name == "optimizer"]

    def in_optimizer(e):
        return any(s <= e.time_range.start and e.time_range.end <= t for s, t in opt_ranges)

    per_op = {}
    for e in events:
        if e.name == "optimizer" or e.name.startswith(("ProfilerStep", "## ")):
            continue
        us = e.self_device_time_total if getattr(e, "device_type", None) and str(e.device_type).endswith("CUDA") \
            else e.self_cpu_time_total
        if in_optimizer(e):
            cat = "optimizer"
        else:
            shapes = str(getattr(e, "input_shapes", ""))
            cat = "other"
            for c, rx in _TORCH_RULES:
                if rx.search(e.name):
                    cat = c
                    break
            if cat == "layer matmuls" and re.search(rf"\b{vocab}\b", shapes):
                cat = "head matmul"
            if cat == "elementwise" and re.search(r"Backward|autograd", e.name):
                cat = "other"
        _add(per_op, f"{e.name} {getattr(e, 'input_shapes', '')}"[:160], cat, us, e.name)
    out = summarise(per_op, n_steps, step_ms, top)
    out["profiler"] = "torch.profiler (self time per op, record_shapes)"
    return out


def table(results):
    """Markdown: ms per step per category, one column per profiled variant."""
    cols = [r for r in results if r.get("profile")]
    if not cols:
        return ""
    lines = ["| ms per step | " + " | ".join(r["variant"] for r in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for c in CATEGORIES + ("attributed_ms_per_step", "step_ms_median"):
        vals = [(r["profile"]["ms_per_step"][c] if c in CATEGORIES else r["profile"][c]) for r in cols]
        label = {"attributed_ms_per_step": "**sum of the above**", "step_ms_median": "step (wall, median)"}.get(c, c)
        lines.append(f"| {label} | " + " | ".join("" if v is None else f"{v:.1f}" for v in vals) + " |")
    return "\n".join(lines)
