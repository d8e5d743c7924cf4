"""tCURLoRA (He, Cheng, Zhu, Cai, Yu; arXiv 2501.02227, MICCAI 2025): tensor-CUR fine-tuning.

Same-shape kernels (a *group*) are transposed to PyTorch's ``(out, in)`` layout and stacked into a
third-order tensor ``T`` of shape ``(n3, n1, n2)`` (``n1`` outputs, ``n2`` inputs). Along the stacking
axis ``D = FFT(T)``; in that domain the t-product is slice-wise matrix multiplication. The official
code (``WangangCheng/t-CURLora``, ``cur_decomposition``) selects, from the pretrained weights only:

1. column scores ``s_col[j] = sum_k ||D_k[:, j]||_2`` and the top-``r`` columns ``I``;
2. row scores on the column-reduced tensor, ``s_row[i] = sum_k ||D_k[i, I]||_2``, top-``r`` rows ``J``;
3. ``C_k = D_k[:, I]``, ``R_k = D_k[J, :]``, ``U0_k = pinv(D_k[J, I])``.

The trainable core ``U`` (``r x r`` per Fourier slice) starts at ``U0`` and the update is
``dT = Re IFFT_k(C_k (U_k - U0_k) R_k)``, exactly zero at init; slice ``k`` of ``dT`` is added to
kernel ``k``. (The released script never trains ``U`` -- ``methods-spec.md`` §1.8; here it is
trained.) Because ``T`` is real, ``D_{n3-k} = conj(D_k)``; only the Hermitian-symmetric part of ``U``
reaches the output, so jlora stores the ``h = n3//2 + 1`` independent slices: ``u_re`` (``h x r x r``)
and ``u_im`` for the genuinely complex slices ``1 .. n3-h`` (``(n3-h) x r x r``; slice 0 and, for even
``n3``, slice ``n3/2`` are real). That is exactly ``n3 * r**2`` real trainable numbers per tensor, the
paper's count; the rest of ``U`` follows by conjugation.

Storage: the adapted tree gets one reserved top-level entry, ``adapted["jlora_tcur"][group]``, with
``u_re`` / ``u_im`` as :class:`jlora.Trainable` leaves and the frozen ``c_re, c_im, r_re, r_im,
u0_re, u0_im`` (half spectrum) plus the selected ``cols`` (I) and ``rows`` (J). Each grouped kernel
becomes a :class:`jlora.AdaptedWeight` with no factors of its own and ``AdapterMeta(method="tcur",
group=..., slices=(k, ...))``. :func:`expand` (registered with :func:`jlora.core.api.register_expander`,
so ``jlora.lift``, ``merge``, ``unmerge`` and ``summary`` call it) writes, per kernel, the real
factors of

    x @ dK_k = sum_{j<h} (w_j / n3) Re[(x R_j^T) (e^{2 pi i jk/n3} M_j^T C_j^T)],  M_j = U_j - U0_j

(``w_j = 2`` for complex slices, 1 for real ones): ``a = [Re R_j^T | Im R_j^T]`` (``n2 x n3 r``, frozen,
shared by every ``k``) and ``b_k = [Re Q_jk ; -Im Q_jk]`` (``n3 r x n1``, differentiable in ``U``), so
``lift`` runs ``x @ W0 + (x @ a) @ b_k`` at ``n3 r (n1 + n2)`` multiply-adds per token, or materialises
the weight when that is more than ``n1 n2`` (the cheaper-path rule, ``jlora.core.lift``).

Example::

    spec = jlora.TCURLoRA(rank=4, train_also=r".*/classifier/(kernel|bias)")   # bert/llama/vit groups
    adapted = jlora.apply(params, spec, key=jax.random.key(0))
    logits = jlora.lift(model.apply)(adapted, ids, mask)
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora.core import api as _api
from jlora.core import axes as axes_mod
from jlora.core.nodes import AdapterMeta, AdaptedWeight, Trainable, is_adapter_leaf, is_node, unwrap
from jlora.core.state import LoRAState, register_state_type
from jlora.core.paths import flatten_with_paths, matches, near_misses, normalize_patterns
from jlora.core.spec import AdapterSpec, CliField

RESERVED = "jlora_tcur"
SELECTIONS = ("norm", "gradient", "fisher", "random", "svd")
_HI = lax.Precision.HIGHEST

# Default groups of jlora's reference models. Order inside a group: per layer, the patterns' order
# (the official code's [out_proj, q, k, v]); layers by their index. Patterns full-match the path.
DEFAULT_GROUPS = {
    "bert": {
        "attention": (r".*/attention/output/dense/kernel", r".*/attention/self/query/kernel",
                      r".*/attention/self/key/kernel", r".*/attention/self/value/kernel"),
        "mlp_up": (r".*/intermediate/dense/kernel",),
        "mlp_down": (r".*/layers?(_\d+)?/output/dense/kernel",),
    },
    "vit": {
        "attention": (r".*/attention/output/dense/kernel", r".*/attention/attention/query/kernel",
                      r".*/attention/attention/key/kernel", r".*/attention/attention/value/kernel"),
        "mlp_up": (r".*/intermediate/dense/kernel",),
        "mlp_down": (r".*/layers?(_\d+)?/output/dense/kernel",),
    },
    "llama": {
        "attention": (r".*/self_attn/o_proj/kernel", r".*/self_attn/q_proj/kernel",
                      r".*/self_attn/k_proj/kernel", r".*/self_attn/v_proj/kernel"),
        "mlp_up": (r".*/mlp/gate_proj/kernel", r".*/mlp/up_proj/kernel"),
        "mlp_down": (r".*/mlp/down_proj/kernel",),
    },
}
_FAMILY_PROBE = {"bert": r".*/attention/self/query/kernel", "vit": r".*/attention/attention/query/kernel",
                 "llama": r".*/self_attn/q_proj/kernel"}


# ------------------------------------------------------------------------------------------
# pure selection functions (jittable; r static)

def fourier(t):
    """``D = FFT(T)`` along the stacking axis 0 (full complex FFT, no normalisation, as torch.fft.fft)."""
    return jnp.fft.fft(t.astype(jnp.float32), axis=0)


def select_fibres(energy, r: int, root: bool):
    """Top-``r`` columns, then top-``r`` rows on the column-reduced tensor, from per-entry
    ``energy`` of shape ``(n3, n1, n2)``. A fibre's score is ``sum_k f(sum_entries energy)`` with
    ``f = sqrt`` when ``root`` (the official ``sum_k ||D_k[:, j]||_2`` with ``energy = |D|^2``) and the
    identity otherwise (``sum_k ||G_k[:, j]||^2`` for gradient / Fisher importance).
    Returns ``(I, J)`` int32, in descending score order (``torch.topk``'s order)."""
    f = jnp.sqrt if root else (lambda v: v)
    col = jnp.sum(f(jnp.sum(energy, axis=1)), axis=0)                 # (n2,)
    cols = lax.top_k(col, r)[1]
    row = jnp.sum(f(jnp.sum(energy[:, :, cols], axis=2)), axis=0)      # (n1,)
    rows = lax.top_k(row, r)[1]
    return cols.astype(jnp.int32), rows.astype(jnp.int32)


def select_norm(t, r: int):
    """The official algorithm on a real ``(n3, n1, n2)`` tensor: ``(I, J)``."""
    d = fourier(t)
    return select_fibres(jnp.real(d * jnp.conj(d)), r, root=True)


def select_random(key, shape, r: int):
    """Seeded uniform choice of ``r`` distinct columns and rows."""
    kc, kr = jax.random.split(key)
    cols = jax.random.permutation(kc, shape[2])[:r]
    rows = jax.random.permutation(kr, shape[1])[:r]
    return cols.astype(jnp.int32), rows.astype(jnp.int32)


def _half(d, n3):
    """The ``h = n3//2 + 1`` independent Fourier slices; slice 0 (and n3/2 for even n3) forced real."""
    h = n3 // 2 + 1
    d = d[:h]
    if not jnp.iscomplexobj(d):
        return d
    real = jnp.zeros((h,), bool).at[0].set(True)
    if n3 % 2 == 0:
        real = real.at[h - 1].set(True)
    return jnp.where(real[:, None, None], jnp.real(d).astype(d.dtype), d)


def cur_factors(d, cols, rows):
    """``(C, R, U0)`` on the half spectrum: ``C_k = D_k[:, I]``, ``R_k = D_k[J, :]``,
    ``U0_k = pinv(D_k[J, I])`` (complex, ``h`` slices)."""
    n3 = d.shape[0]
    dh = _half(d, n3)
    c = dh[:, :, cols]
    rr = dh[:, rows, :]
    u0 = jnp.linalg.pinv(c[:, rows, :])
    return c, rr, u0


def svd_factors(d, r: int):
    """The SVD alternative with the same ``n3 r^2`` trainable core: per Fourier slice the top-``r``
    singular triplets, balanced, ``C_k = U_r sqrt(S_r)``, ``R_k = sqrt(S_r) V_r^H``, ``U0_k = I``
    (so ``C U0 R`` is the best rank-``r`` approximation of ``D_k``; conjugate slices follow by symmetry)."""
    n3 = d.shape[0]
    dh = _half(d, n3)
    u, s, vh = jnp.linalg.svd(dh, full_matrices=False)
    root = jnp.sqrt(s[:, :r]).astype(dh.dtype)
    c = u[:, :, :r] * root[:, None, :]
    rr = root[:, :, None] * vh[:, :r, :]
    u0 = jnp.broadcast_to(jnp.eye(r, dtype=dh.dtype), (dh.shape[0], r, r))
    return c, rr, u0


# ------------------------------------------------------------------------------------------
# the update: shared parameters -> per-kernel real factors

def _weights(n3):
    h = n3 // 2 + 1
    w = np.full((h,), 2.0)
    w[0] = 1.0
    if n3 % 2 == 0:
        w[h - 1] = 1.0
    return w


def group_shapes(gp) -> dict:
    """``{"n3", "h", "nc", "r", "n1", "n2"}`` of a group's parameters."""
    u_re, u_im = unwrap(gp["u_re"]), unwrap(gp["u_im"])
    h, r = u_re.shape[0], u_re.shape[-1]
    nc = u_im.shape[0]
    return dict(n3=h + nc, h=h, nc=nc, r=r, n1=gp["c_re"].shape[1], n2=gp["r_re"].shape[2])


def _complex(gp, name):
    return gp[name + "_re"] + 1j * gp[name + "_im"].astype(jnp.float32)


def core(gp):
    """``U - U0`` on the half spectrum (complex ``h x r x r``), differentiable in ``u_re`` / ``u_im``."""
    sh = group_shapes(gp)
    u_re = unwrap(gp["u_re"]).astype(jnp.float32)
    u_im = jnp.zeros_like(u_re).at[1:1 + sh["nc"]].set(unwrap(gp["u_im"]).astype(jnp.float32))
    return (u_re - gp["u0_re"]) + 1j * (u_im - gp["u0_im"])


def full_core(gp):
    """The full ``U`` (``n3 x r x r`` complex) that the stored half spectrum stands for
    (``U_{n3-k} = conj(U_k)``)."""
    sh = group_shapes(gp)
    u_re = unwrap(gp["u_re"]).astype(jnp.float32)
    u_im = jnp.zeros_like(u_re).at[1:1 + sh["nc"]].set(unwrap(gp["u_im"]).astype(jnp.float32))
    half = u_re + 1j * u_im
    mirror = jnp.conj(half[1:1 + sh["nc"]])[::-1]
    return jnp.concatenate([half, mirror], axis=0)


def _full(half, n3, nc):
    return jnp.concatenate([half, jnp.conj(half[1:1 + nc])[::-1]], axis=0)


def reference_delta(gp, u=None):
    """``IFFT(C (U - U0) R)`` over all ``n3`` slices, complex ``(n3, n1, n2)``, computed the slow way
    the official code does (``u``: a full complex core, default the stored one). Its real part is the
    update in ``(out, in)`` layout; for a Hermitian-symmetric ``U`` the imaginary part is ~0."""
    sh = group_shapes(gp)
    n3, nc = sh["n3"], sh["nc"]
    c, rr, u0 = (_full(_complex(gp, k), n3, nc) for k in ("c", "r", "u0"))
    u = full_core(gp) if u is None else u
    prod = jnp.einsum("kis,kst,ktj->kij", c, u - u0, rr, precision=_HI)
    return jnp.fft.ifft(prod, axis=0)


def group_factors(gp):
    """``(A, B)``: ``A`` (``n2 x R``, frozen) and ``B`` (``n3 x R x n1``) with ``R = n3 r`` and
    ``x @ A @ B[k] = x @ dK_k`` for the Flax ``(in, out)`` kernel ``k`` of the group."""
    sh = group_shapes(gp)
    n3, h, nc, r, n1, n2 = (sh[k] for k in ("n3", "h", "nc", "r", "n1", "n2"))
    cm = jnp.einsum("jns,jst->jnt", _complex(gp, "c"), core(gp), precision=_HI)          # (h, n1, r)
    k = np.arange(n3)
    j = np.arange(h)
    phase = (_weights(n3)[:, None] * np.exp(2j * np.pi * np.outer(j, k) / n3) / n3).astype(np.complex64)
    q = jnp.einsum("jk,jnt->kjtn", phase, cm, precision=_HI)                              # (n3, h, r, n1)
    b = jnp.concatenate([jnp.real(q).reshape(n3, h * r, n1),
                         -jnp.imag(q[:, 1:1 + nc]).reshape(n3, nc * r, n1)], axis=1)
    a = jnp.concatenate([gp["r_re"].reshape(h * r, n2).T,
                         gp["r_im"][1:1 + nc].reshape(nc * r, n2).T], axis=1)
    return a.astype(jnp.float32), b.astype(jnp.float32)


def expand(tree):
    """``tree`` without ``"jlora_tcur"`` and with every tCURLoRA node given its factors
    (``a`` shared per group, ``b`` per slice; differentiable in the cores)."""
    groups = tree[RESERVED]
    rest = type(tree)({k: v for k, v in tree.items() if k != RESERVED})
    factors = {}

    def fill(leaf):
        if not is_node(leaf):
            return leaf
        meta = leaf.meta
        todo = [n for n in leaf.names if meta[n].group and leaf.states[n].a is None]
        if not todo:
            return leaf
        states = dict(leaf.states)
        for n in todo:
            g = meta[n].group
            if g not in groups:
                raise ValueError(f"{leaf.path!r}: tCURLoRA group {g!r} is not in {RESERVED!r} (has {list(groups)})")
            if g not in factors:
                factors[g] = group_factors(groups[g])
            a, b = factors[g]
            stack, ins, outs = leaf.layout.split(leaf.shape)
            rank = a.shape[1]
            bk = b[np.asarray(meta[n].slices)]
            states[n] = states[n].replace(a=jnp.broadcast_to(a.reshape(ins + (rank,)), stack + ins + (rank,)),
                                          b=bk.reshape(stack + (rank,) + outs))
        return leaf.with_(states=states)

    return jax.tree_util.tree_map(fill, rest, is_leaf=is_adapter_leaf)


def _summary_lines(tree):
    groups = tree[RESERVED]
    flat, _ = flatten_with_paths(tree, is_leaf=is_adapter_leaf)
    users = {}
    for _, leaf in flat:
        if is_node(leaf):
            for n, m in leaf.adapters:
                if m.method == "tcur":
                    users.setdefault(m.group, [0, m.init])[0] += len(m.slices)
    lines = ["tCURLoRA tensors (trainable core U: n3*r^2 real numbers = u_re (h*r^2) + u_im ((n3-h)*r^2)):"]
    for g, gp in groups.items():
        sh = group_shapes(gp)
        n_train = sum(int(np.prod(np.shape(unwrap(gp[k])))) for k in ("u_re", "u_im"))
        slices, sel = users.get(g, [0, "?"])
        lines.append(f"  {g}: {slices} kernels stacked, n3={sh['n3']}, slice {sh['n1']}x{sh['n2']} (out x in), "
                     f"r={sh['r']}, selection={sel}, trainable {n_train:,}, factored rank n3*r={sh['n3'] * sh['r']}")
    return lines


def _prune(tree):
    """``tree`` without the groups of ``"jlora_tcur"`` that no node's adapter uses (the whole entry
    when none is left), so deleting the adapter leaves no trainable core behind."""
    used = {m.group for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_adapter_leaf) if is_node(leaf)
            for _, m in leaf.adapters if m.group}
    groups = {g: v for g, v in tree[RESERVED].items() if g in used}
    rest = {k: v for k, v in tree.items() if k != RESERVED}
    return type(tree)({**rest, RESERVED: groups} if groups else rest)


_api.register_expander(RESERVED, expand, _summary_lines, _prune)
register_state_type("tcur", LoRAState)   # per-node factors, filled in by expand from the shared cores


# ------------------------------------------------------------------------------------------
# the spec

def _layer_of(path: str) -> int:
    m = re.search(r"_(\d+)(?:/|$)", path)
    return int(m.group(1)) if m else 0


@dataclasses.dataclass(frozen=True)
class TCURLoRA(AdapterSpec):
    """tCURLoRA: one trainable ``n3 x r x r`` core per stacked tensor of same-shape kernels.

    Args:
      rank: ``r`` per tensor (int), ``{group: r}``, or ``"auto"`` (needs ``budget``): ranks in
        proportion to each group's importance (the summed energy its selection ranks fibres by:
        ``|D|^2`` for norm/random/svd, accumulated squared gradients, Fisher mass), so that
        ``sum_g n3_g r_g^2 <= budget`` with ``r_g >= 1``.
      groups: ``{name: pattern or [patterns]}``: which kernels form each tensor; order within a
        tensor is by layer index (the first ``_<number>`` in the path, or the stacked-layer axis),
        then by pattern. ``None``: jlora's bert / llama / vit defaults (``DEFAULT_GROUPS``; all
        attention projections [o, q, k, v per layer], MLP up (llama: gate and up), MLP down; the
        attention tensor is split by shape when k/v differ, as with grouped-query attention).
      selection: "norm" (official: top-r Fourier fibre norms), "gradient" (sum over calibration
        batches of squared batch gradients per fibre), "fisher" (mean over examples of squared
        per-example gradients), "random" (seeded by ``apply``'s key), "svd" (top-r singular
        triplets per Fourier slice; same core size).
      calibration: ``(loss_fn, batches)`` for gradient / fisher (and for ``rank="auto"`` with
        them): ``loss_fn(params, batch) -> scalar`` on the plain params; ``batches`` an iterable of
        batches whose leaves have a leading example axis (fisher vmaps... scans over it).
      budget: total trainable core parameters for ``rank="auto"``.
      scale: multiplies the update, ``dT = scale * Re IFFT(C (U - U0) R)`` (default 1, the paper's;
        no ``alpha / r``). ``C`` and ``R`` are raw Fourier fibres, whose norms grow with ``n3``;
        under Adam (no weight decay) ``scale = s`` at learning rate ``lr`` trains the core like
        ``scale = 1`` at ``s * lr`` while the rest of the trainable tree keeps ``lr``.
      train_also / axes / exclude: as for :class:`jlora.LoRA` (``exclude`` removes kernels from groups).
    """

    rank: Any = 4
    groups: Any = None
    selection: str = "norm"
    calibration: Any = dataclasses.field(default=None, compare=False, repr=False)
    budget: int | None = None
    scale: float = 1.0

    method = "tcur"
    shares_parameters = True
    cli_method = "tcur"
    cli_fields = (
        CliField("selection", "norm", "tcur: how fibres are chosen (norm: the paper's; gradient/fisher calibrate on "
                 "training batches)", "choice", SELECTIONS),
        CliField("tcur_scale", 1.0, "tcur: multiplies the update (default 1, the paper's)", "positive_number"),
        CliField("budget", None, "tcur: total core parameters; ranks per tensor then follow importance (--rank is "
                 "ignored)", "optional_positive_int"),
        CliField("calib_batches", 4, "tcur: training batches for gradient/fisher selection (default 4)", "positive_int"),
    )

    @classmethod
    def from_cli(cls, settings, common, context):
        calibrated = settings["selection"] in ("gradient", "fisher")
        return cls(rank="auto" if settings["budget"] else settings["rank"], budget=settings["budget"],
                   selection=settings["selection"], scale=settings["tcur_scale"], exclude=common["exclude"],
                   calibration=context.calibration() if calibrated else None, train_also=common["train_also"])

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f"TCURLoRA selection must be one of {SELECTIONS}, got {self.selection!r}")
        r = self.rank
        if isinstance(r, Mapping):
            bad = {k: v for k, v in r.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
            if bad:
                raise ValueError(f"TCURLoRA rank per group must be positive ints, got {bad}")
            object.__setattr__(self, "rank", tuple(r.items()))
        elif r == "auto":
            if not isinstance(self.budget, int) or self.budget < 1:
                raise ValueError(f"TCURLoRA(rank='auto') needs budget=<total trainable core params>, got {self.budget!r}")
        elif not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"TCURLoRA rank must be a positive int, a {{group: int}} mapping or 'auto', got {r!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not (
                math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"TCURLoRA scale must be a positive finite number, got {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))
        if self.selection in ("gradient", "fisher"):
            cal = self.calibration
            if not (isinstance(cal, (tuple, list)) and len(cal) == 2 and callable(cal[0])):
                raise ValueError(f"selection={self.selection!r} needs calibration=(loss_fn, batches), got {cal!r}")
        if self.groups is not None:
            if not isinstance(self.groups, Mapping) or not self.groups:
                raise TypeError(f"TCURLoRA groups must be a non-empty {{name: pattern(s)}} mapping, got {self.groups!r}")
            norm = []
            for g, pats in self.groups.items():
                if not isinstance(g, str) or not g or "/" in g:
                    raise ValueError(f"TCURLoRA group names must be non-empty strings without '/', got {g!r}")
                norm.append((g, normalize_patterns(pats, f"groups[{g!r}]")))
            object.__setattr__(self, "groups", tuple(norm))
        targets = [p for _, pats in (self.groups or ()) for p in pats] or [r".*kernel"]
        object.__setattr__(self, "targets", tuple(targets))
        object.__setattr__(self, "exclude", normalize_patterns(self.exclude, "exclude"))
        object.__setattr__(self, "train_also", normalize_patterns(self.train_also, "train_also"))
        if self.axes is not None:
            object.__setattr__(self, "axes", tuple(dict(self.axes).items()))

    def to_json(self) -> dict:
        out = {k: v for k, v in super().to_json().items() if k != "calibration"}
        if isinstance(self.rank, tuple):
            out["rank"] = dict(self.rank)
        return out

    def rank_for(self, group: str):
        if isinstance(self.rank, tuple):
            ranks = dict(self.rank)
            if group not in ranks:
                raise ValueError(f"TCURLoRA rank mapping has no entry for group {group!r} (has {list(ranks)})")
            return ranks[group]
        return self.rank

    # -- grouping ------------------------------------------------------------------------------
    def resolve_groups(self, flat, spec_layouts):
        """``{group: [(order_key, leaf_index, stack_position), ...]}`` sorted, plus shapes."""
        paths = [p for p, _ in flat]
        if self.groups is not None:
            declared, defaults = list(self.groups), False
            full = False
        else:
            family = next((f for f, probe in _FAMILY_PROBE.items() if any(re.fullmatch(probe, p) for p in paths)), None)
            if family is None:
                raise ValueError("TCURLoRA(groups=None) knows jlora's bert / llama / vit parameter names and found "
                                 "none of them; pass groups={'name': [regex, ...]} (kernels of one shape per group)")
            declared, defaults, full = list(DEFAULT_GROUPS[family].items()), True, True
        claimed, groups = {}, {}
        for g, pats in declared:
            entries = []
            for i, (p, leaf) in enumerate(flat):
                hit = [n for n, pat in enumerate(pats)
                       if (re.fullmatch(pat, p) if full else matches(p, (pat,), modules=False))]
                if not hit or matches(p, self.exclude):
                    continue
                if i in claimed:
                    raise ValueError(f"{p!r} matches TCURLoRA groups {claimed[i]!r} and {g!r}; groups must be disjoint")
                if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)
                        and leaf.ndim >= 2) or is_adapter_leaf(leaf):
                    raise ValueError(f"TCURLoRA group {g!r} matches {p!r}, which is not a plain floating kernel "
                                     f"({type(leaf).__name__}{getattr(leaf, 'shape', '')})")
                claimed[i] = g
                layout = spec_layouts(p, leaf, i)
                stack, ins, outs = layout.split(leaf.shape)
                mat = (math.prod(outs), math.prod(ins))
                for s in range(math.prod(stack)):
                    entries.append(((_layer_of(p) + s, hit[0], p), i, s, mat, layout))
            if not entries:
                if defaults:
                    continue
                raise ValueError(f"TCURLoRA group {g!r} patterns {list(pats)} match no kernel. "
                                 f"Closest paths: {near_misses(list(pats), paths)}")
            entries.sort(key=lambda e: e[0])
            shapes = {}
            for e in entries:
                shapes.setdefault(e[3], []).append(e)
            if len(shapes) > 1:
                if not defaults:
                    raise ValueError(f"TCURLoRA group {g!r} mixes kernel shapes (out x in): "
                                     f"{ {s: sorted({flat[e[1]][0] for e in es})[:3] for s, es in shapes.items()} }; "
                                     f"a stacked tensor needs one shape: split the group")
                for n, (shape, es) in enumerate(shapes.items()):
                    groups[g if n == 0 else f"{g}_{shape[0]}x{shape[1]}"] = es
            else:
                groups[g] = entries
        if not groups:
            raise ValueError("TCURLoRA: no group matched any kernel")
        return groups

    # -- jlora.apply entry point -----------------------------------------------------------------
    def apply_tree(self, params, key, *, name: str, model=None, example=None):
        """Called by :func:`jlora.apply` (which validates ``name`` and makes ``key`` a PRNG key)."""
        if not isinstance(params, Mapping):
            raise TypeError(f"TCURLoRA needs a params mapping (Linen variables dict) to hold {RESERVED!r}, "
                            f"got {type(params).__name__}")
        if RESERVED in params:
            raise ValueError(f"params already hold {RESERVED!r}: one tCURLoRA adapter per tree")
        flat, treedef = flatten_with_paths(params, is_leaf=is_adapter_leaf)
        if any(is_node(l) for _, l in flat):
            raise ValueError("TCURLoRA is applied to plain params (no other adapters on the tree)")
        inferred = {}
        if model is not None:
            inferred = axes_mod.infer_layouts(model, params, example, is_leaf=is_adapter_leaf)
        layouts = lambda p, leaf, i: _api.layout_for(self, p, leaf, inferred, i)
        groups = self.resolve_groups(flat, layouts)

        tensors = {g: stack_tensor([flat[e[1]][1] for e in es], es) for g, es in groups.items()}
        energy = importance(self, params, flat, treedef, groups, tensors)
        ranks = allocate_ranks(self, groups, energy, tensors)

        shared, leaves = {}, [l for _, l in flat]
        for gi, (g, es) in enumerate(groups.items()):
            t, r = tensors[g], ranks[g]
            n3, n1, n2 = t.shape
            if r > min(n1, n2):
                raise ValueError(f"TCURLoRA rank {r} for group {g!r} exceeds min(out={n1}, in={n2})")
            d = fourier(t)
            cols = rows = None
            if self.selection == "svd":
                c, rr, u0 = svd_factors(d, r)
            else:
                if self.selection == "random":
                    cols, rows = select_random(jax.random.fold_in(key, gi), t.shape, r)
                else:
                    cols, rows = select_fibres(energy[g], r, self.selection == "norm")
                c, rr, u0 = cur_factors(d, cols, rows)
            shared[g] = _group_params(g, c, rr, u0, n3, cols, rows)
            meta_of = {}
            for slot, e in enumerate(es):
                meta_of.setdefault(e[1], {})[e[2]] = slot
            for i, slots in meta_of.items():
                path, leaf = flat[i]
                layout = es[[e[1] for e in es].index(i)][4]
                ks = tuple(slots[s] for s in range(len(slots)))
                meta = AdapterMeta(method="tcur", rank=int(r), scale=self.scale, init=self.selection, group=g, slices=ks)
                leaves[i] = AdaptedWeight(base=leaf, states={name: LoRAState()}, layout=layout,
                                          adapters=((name, meta),), active=(name,), path=path)
        tree = jax.tree_util.tree_unflatten(treedef, leaves)
        if self.train_also:
            tree = _api.mark_trainable(tree, self.train_also)
        return type(tree)({**tree, RESERVED: shared})


def stack_tensor(arrays, entries):
    """The ``(n3, n1, n2)`` float32 tensor of a group: each kernel (layer) reshaped to
    ``(in, out)`` and transposed to ``(out, in)``."""
    mats = []
    for arr, e in zip(arrays, entries):
        _, i, s, (n1, n2), layout = e
        stack, ins, outs = layout.split(arr.shape)
        m = jnp.asarray(arr).reshape((math.prod(stack), n2, n1))[s]
        mats.append(m.astype(jnp.float32).T)
    return jnp.stack(mats)


def _group_params(g, c, rr, u0, n3, cols, rows):
    h = n3 // 2 + 1
    nc = n3 - h
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    u0 = _half(u0, n3)   # U0 of the real slices is real, like the stored core's: an exact zero update
    out = {
        "u_re": Trainable(f32(jnp.real(u0)), f"{RESERVED}/{g}/u_re"),
        "u_im": Trainable(f32(jnp.imag(u0[1:1 + nc])), f"{RESERVED}/{g}/u_im"),
        "c_re": f32(jnp.real(c)), "c_im": f32(jnp.imag(c)),
        "r_re": f32(jnp.real(rr)), "r_im": f32(jnp.imag(rr)),
        "u0_re": f32(jnp.real(u0)), "u0_im": f32(jnp.imag(u0)),
    }
    if cols is not None:
        out["cols"], out["rows"] = jnp.asarray(cols, jnp.int32), jnp.asarray(rows, jnp.int32)
    return out


# ------------------------------------------------------------------------------------------
# importance (selection scores) and rank allocation

def importance(spec, params, flat, treedef, groups, tensors):
    """Per group, the per-entry energy ``(n3, n1, n2)`` the fibres are ranked by: ``|FFT(T)|^2``
    for norm / random / svd, summed squared batch gradients for gradient, the mean squared
    per-example gradient (empirical Fisher diagonal) for fisher."""
    if spec.selection not in ("gradient", "fisher"):
        out = {}
        for g, t in tensors.items():
            d = fourier(t)
            out[g] = jnp.real(d * jnp.conj(d))
        return out
    loss_fn, batches = spec.calibration
    idx = sorted({e[1] for es in groups.values() for e in es})
    leaves = [l for _, l in flat]
    pos = {i: n for n, i in enumerate(idx)}

    def loss_of(sel, others, batch):
        full = [sel[pos[i]] if i in pos else others[i] for i in range(len(leaves))]
        return loss_fn(jax.tree_util.tree_unflatten(treedef, full), batch)

    sel = [jnp.asarray(leaves[i]) for i in idx]
    others = [None if i in pos else l for i, l in enumerate(leaves)]
    grad = jax.grad(loss_of)
    if spec.selection == "gradient":
        @jax.jit
        def acc_fn(acc, sel, others, batch):
            return [a + jnp.square(g.astype(jnp.float32)) for a, g in zip(acc, grad(sel, others, batch))]
    else:
        @jax.jit
        def acc_fn(acc, sel, others, batch):
            def one(a, ex):
                ex1 = jax.tree_util.tree_map(lambda x: x[None], ex)
                return [x + jnp.square(g.astype(jnp.float32)) for x, g in zip(a, grad(sel, others, ex1))], None
            return lax.scan(one, acc, batch)[0]
    acc = [jnp.zeros(np.shape(leaves[i]), jnp.float32) for i in idx]
    n = 0
    for batch in batches:
        acc = acc_fn(acc, sel, others, batch)
        n += int(jax.tree_util.tree_leaves(batch)[0].shape[0]) if spec.selection == "fisher" else 1
    if n == 0:
        raise ValueError("TCURLoRA calibration batches are empty")
    if spec.selection == "fisher":
        acc = [a / n for a in acc]
    by_index = dict(zip(idx, acc))
    return {g: stack_tensor([by_index[e[1]] for e in es], es) for g, es in groups.items()}


def allocate_ranks(spec, groups, energy, tensors) -> dict:
    """Fixed ranks, or for ``rank="auto"`` ``r_g = max(1, floor(c * imp_g / sum imp))`` with the
    largest ``c`` that keeps ``sum_g n3_g r_g^2 <= budget`` (``imp_g`` = the group's total energy)."""
    if spec.rank != "auto":
        return {g: spec.rank_for(g) for g in groups}
    imp = {g: float(jnp.sum(energy[g])) for g in groups}
    total = sum(imp.values()) or 1.0
    share = {g: v / total for g, v in imp.items()}
    n3 = {g: tensors[g].shape[0] for g in groups}
    cap = {g: min(tensors[g].shape[1:]) for g in groups}

    def ranks(c):
        return {g: int(min(cap[g], max(1, math.floor(c * share[g])))) for g in groups}

    def cost(rk):
        return sum(n3[g] * rk[g] ** 2 for g in groups)

    if cost(ranks(0.0)) > spec.budget:
        raise ValueError(f"TCURLoRA budget {spec.budget} is below the minimum of r=1 per group "
                         f"({cost(ranks(0.0))} = sum of n3 over groups {n3})")
    lo, hi = 0.0, 1.0
    while cost(ranks(hi)) <= spec.budget and hi < 1e9 and ranks(hi) != {g: cap[g] for g in groups}:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(ranks(mid)) <= spec.budget else (lo, mid)
    return ranks(lo)
