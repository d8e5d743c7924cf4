"""AdaLoRA (Zhang et al. 2023): SVD-form adapters whose rank budget is reallocated by importance.

``delta W = scale * P diag(E) Q`` with, in Flax's (in, out) layout, ``a = Q^T`` (stack + inputs
+ (r,)), ``e = diag(E)`` (stack + (r,), kept in the node's ``extra[name]["e"]``) and ``b = P^T``
(stack + (r,) + outputs); ``scale = alpha / (init_r + 1e-5)``, fixed at ``init_r`` for the whole
run as PEFT's ``ranknum`` is. Init as PEFT: ``E = 0`` (so the adapter starts as a no-op),
``A, B ~ N(0, 0.02^2)``.

The rank allocator (PEFT's ``RankAllocator`` + ``AdaLoraModel.update_and_allocate``) is a set of
pure functions over an explicit :class:`AdaLoRAState`, run *inside* the jitted train step through
``jlora.train.make_step(..., adapter_update=jlora.adalora_allocator(spec))``; nothing has to be
called by hand after the optimizer. Every step ``t`` (0 on the first step):

* ``t < T - tfinal``: importance ``I = |w * grad|`` for every element of A, B, E (``w`` after the
  optimizer update, ``grad`` the gradient it used, as PEFT calls it after ``optimizer.step()``);
  ``I_bar <- b1 I_bar + (1-b1) I``; ``U_bar <- b2 U_bar + (1-b2) |I - I_bar|``.
* budget ``b(t)``: ``b0 = sum init_r`` over modules while ``t <= tinit``; then
  ``int((b0 - bT) (1 - (t - tinit) / (T - tfinal - tinit))^3 + bT)`` with ``bT = target_r * #modules``.
* ``tinit < t < T - tfinal`` and ``t % delta_t == 0``, or ``t == T - tfinal`` (forced, with the
  scores of the previous step, then the scores are reset): triplet score
  ``S_i = s(E_i) + (mean_j s(A_ji) + mean_j s(B_ij))`` with ``s = I_bar * U_bar``; the threshold is
  the ``k``-th smallest score over all modules, ``k = b0 - b(t)``; ``E_i <- 0`` where
  ``S_i <= threshold``. The mask is stored as the rank pattern.
* ``t > T - tfinal``: the stored (final) rank pattern is applied again (E re-zeroed) every step.

Each layer slice of a stacked (scanned) kernel is its own module for the budget and for the
orthogonality regulariser ``orth_reg_weight * mean over all A and B of ||A A^T - I||_F`` /
``||B^T B - I||_F`` (PyTorch layout; here ``a^T a`` and ``b b^T``, both r x r; the Frobenius norm,
not squared, as PEFT).

Masked triplets keep their A and B (and keep training, as in PEFT); ``jlora.io.save_adapter``
drops them: :func:`truncate` keeps only the triplets whose singular value is non-zero.

Example::

    spec = jlora.AdaLoRA(init_r=12, target_r=8, total_steps=1000, tinit=100, tfinal=200,
                         targets=r".*/(query|value)/kernel")
    adapted = jlora.apply(params, spec, key=jax.random.key(0))
    trainable, frozen = jlora.partition(adapted)
    alloc = jlora.adalora_allocator(spec)
    step = jlora.train.make_step(loss_fn, optimizer, adapter_update=alloc)
    opt_state = jlora.train.init_opt_state(optimizer, trainable, adapter_update=alloc)
    for i in range(1000):
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, key)
    # metrics["adalora_rank"]: non-zero singular values now; metrics["adalora_budget"]: b(t)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from typing import Any, ClassVar, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora.core.errors import PeftFormatError
from jlora.core.nodes import AdapterMeta, Layout, is_adapter_leaf, is_node
from jlora.core.paths import flatten_with_paths
from jlora.core.spec import AdapterSpec, CliField
from jlora.core.state import AdapterState, register_state_type
from jlora.methods import _peft as peft_format
from jlora.methods.lora import _peft_dropout, check_lora_config_fields, init_changed_base_warning, read_lora_factors

__all__ = ["AdaLoRA", "AdaLoRAState", "AdaLoRAAllocator", "adalora_allocator", "budget_schedule",
           "update_importance", "triplet_scores", "mask_threshold", "orthogonal_regularizer",
           "kept_ranks", "truncate", "prepare_for_save"]

RANKNUM_EPS = 1e-5   # PEFT: scaling / (ranknum + 1e-5)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class AdaLoRA(AdapterSpec):
    """AdaLoRA spec (defaults are PEFT's ``AdaLoraConfig``'s).

    Example::

        spec = jlora.AdaLoRA(init_r=12, target_r=8, total_steps=1000, targets=["query", "value"])
        adapted = jlora.apply(params, spec, key=jax.random.key(0))

    Args:
      init_r: rank every targeted kernel starts with (the triplets the budget starts from).
      target_r: average rank per module the budget ends at (``bT = target_r * #modules``).
      tinit: warm-up steps with the full budget (no masking).
      tfinal: final steps with the budget frozen at ``bT`` (the final rank pattern re-applied).
      delta_t: mask every ``delta_t`` steps in the budget-decreasing phase.
      beta1, beta2: EMA factors of the importance and of its uncertainty, in (0, 1).
      orth_reg_weight: weight of the orthogonality regulariser added to the loss (>= 0).
      total_steps: number of training steps the schedule spans (required, > 0; PEFT's ``total_step``).
      alpha: scale numerator: ``scale = alpha / (init_r + 1e-5)`` (PEFT: ``alpha <= 0`` means
        ``init_r``).
      dropout: dropout on the adapter's input (needs ``jlora_rng=`` at call time).
      dtype: dtype of A, B, E (default float32).
      rank_pattern: kept ranks per module path, written by ``jlora.io.save_adapter`` (informative;
        the saved arrays carry the ranks). Not used to build adapters.
      targets / exclude / train_also / axes: as for :class:`jlora.LoRA`.
    """

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_steps: int | None = None
    alpha: float = 8.0
    dropout: float = 0.0
    dtype: Any = jnp.float32
    rank_pattern: Mapping[str, Any] | None = None

    method = "adalora"
    cli_method = "adalora"
    cli_fields = (
        CliField("init_r", 12, "adalora: initial rank of every module (default 12)", "positive_int"),
        CliField("target_r", 8, "adalora: average rank the budget falls to (default 8)", "positive_int"),
        CliField("tinit", 0, "adalora: warm-up steps before any rank is masked", "int>=0"),
        CliField("tfinal", 0, "adalora: final steps with the budget fixed at the target", "int>=0"),
        CliField("delta_t", 1, "adalora: mask every N steps in between", "positive_int"),
        CliField("orth_reg_weight", 0.5, "adalora: weight of the orthogonality regulariser", "number>=0"),
    )

    @classmethod
    def from_cli(cls, settings, common, context):
        return cls(init_r=settings["init_r"], target_r=settings["target_r"], tinit=settings["tinit"],
                   tfinal=settings["tfinal"], delta_t=settings["delta_t"], orth_reg_weight=settings["orth_reg_weight"],
                   total_steps=settings["steps"], alpha=settings["alpha"], dropout=settings["dropout"],
                   targets=common["targets"], exclude=common["exclude"], train_also=common["train_also"])

    def __post_init__(self):
        self._validate_common()
        if not _is_int(self.init_r) or self.init_r < 1:
            raise ValueError(f"AdaLoRA init_r must be a positive int, got {self.init_r!r}")
        if not _is_int(self.target_r) or not 0 <= self.target_r <= self.init_r:
            raise ValueError(f"AdaLoRA target_r must be an int in [0, init_r={self.init_r}], got {self.target_r!r}")
        if self.total_steps is None or not _is_int(self.total_steps) or self.total_steps <= 0:
            raise ValueError(f"AdaLoRA needs total_steps, the number of training steps the rank budget schedule "
                             f"spans, as an int > 0; got total_steps={self.total_steps!r}")
        for name in ("tinit", "tfinal"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise ValueError(f"AdaLoRA {name} must be a non-negative int, got {v!r}")
        if not _is_int(self.delta_t) or self.delta_t < 1:
            raise ValueError(f"AdaLoRA delta_t must be a positive int, got {self.delta_t!r}")
        if self.tinit >= self.total_steps - self.tfinal:
            raise ValueError(
                f"AdaLoRA schedule leaves no budgeting phase: tinit={self.tinit} must be < total_steps - tfinal = "
                f"{self.total_steps} - {self.tfinal} = {self.total_steps - self.tfinal}; decrease tinit/tfinal or "
                f"increase total_steps")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not _is_num(v) or not 0.0 < v < 1.0:
                raise ValueError(f"AdaLoRA {name} must be in (0, 1), got {v!r}")
        if not _is_num(self.orth_reg_weight) or self.orth_reg_weight < 0:
            raise ValueError(f"AdaLoRA orth_reg_weight must be a finite number >= 0, got {self.orth_reg_weight!r}")
        if not _is_num(self.alpha):
            raise ValueError(f"AdaLoRA alpha must be a finite number, got {self.alpha!r}")
        if not _is_num(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdaLoRA dropout must be in [0, 1), got {self.dropout!r}")
        try:
            jnp.dtype(self.dtype)
        except TypeError:
            raise TypeError(f"AdaLoRA dtype must be a floating dtype, got {self.dtype!r}") from None
        if self.rank_pattern is not None:
            if isinstance(self.rank_pattern, tuple):  # already normalised (dataclasses.replace)
                object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
            if not isinstance(self.rank_pattern, Mapping):
                raise TypeError(f"rank_pattern must map module paths to kept ranks, got {self.rank_pattern!r}")
            object.__setattr__(self, "rank_pattern", tuple((str(k), _as_tuple(v)) for k, v in self.rank_pattern.items()))

    @property
    def scale(self) -> float:
        """``alpha / (init_r + 1e-5)`` (``init_r / (init_r + 1e-5)`` when ``alpha <= 0``, as PEFT)."""
        num = float(self.alpha) if self.alpha > 0 else float(self.init_r)
        return num / (self.init_r + RANKNUM_EPS)

    def init_state(self, key, base, layout: Layout, path: str, embedding: bool = False):
        """``(SVDState(a, e, b), base, meta)``: ``a, b ~ N(0, 0.02^2)``, ``e = 0`` (a no-op at init;
        the base is unchanged)."""
        a, b, base, meta = self.init_factors(key, base, layout, path, embedding)
        e = jnp.zeros(tuple(base.shape[:layout.stack]) + (meta.rank,), jnp.dtype(self.dtype))
        return SVDState(a, e, b), base, meta

    def init_factors(self, key, base, layout: Layout, path: str, embedding: bool = False):
        """Returns ``(a, b, base, AdapterMeta)``: ``a, b ~ N(0, 0.02^2)`` (the base is unchanged)."""
        rank = self.init_r
        stack, inputs, outputs = layout.split(base.shape)
        n_in, n_out = math.prod(inputs), math.prod(outputs)
        if rank > min(n_in, n_out):
            raise ValueError(
                f"AdaLoRA init_r={rank} for {path!r} exceeds min(inputs={n_in}, outputs={n_out}) of kernel "
                f"{tuple(base.shape)}")
        dtype = jnp.dtype(self.dtype)
        ka, kb = jax.random.split(key)
        a = 0.02 * jax.random.normal(ka, stack + inputs + (rank,), dtype)
        b = 0.02 * jax.random.normal(kb, stack + (rank,) + outputs, dtype)
        meta = AdapterMeta(method="adalora", rank=rank, scale=self.scale, dropout=float(self.dropout), init="adalora")
        return a, b, base, meta



@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SVDState(AdapterState):
    """AdaLoRA's SVD-form state: ``a = Q^T`` (stack + inputs + (r,)), the singular values ``e``
    (stack + (r,)) and ``b = P^T`` (stack + (r,) + outputs); ``delta W = s * (a * e) @ b``."""

    a: Any = None
    e: Any = None
    b: Any = None

    additive: ClassVar[bool] = True
    title: ClassVar[str] = "AdaLoRA"

    @classmethod
    def before_save(cls, tree, spec):
        return prepare_for_save(tree, spec)

    def factors(self, layout):
        if self.a is None or self.b is None or self.e is None:
            return None
        s = layout.stack
        e = self.e.reshape(self.e.shape[:s] + (1,) * layout.inputs + self.e.shape[s:])
        return self.a * e.astype(self.a.dtype), self.b


register_state_type("adalora", SVDState)


def _as_tuple(v):
    if isinstance(v, (list, tuple)):
        return tuple(_as_tuple(x) for x in v)
    if isinstance(v, np.ndarray):
        return _as_tuple(v.tolist())
    if not _is_int(v) or v < 0:
        raise ValueError(f"rank_pattern values must be non-negative ints (or nested lists of them), got {v!r}")
    return int(v)


# ------------------------------------------------------------------------------------------
# modules

def _modules(tree, name: str):
    """``[(path, node)]`` for every node carrying the AdaLoRA adapter ``name`` with its factors."""
    flat, _ = flatten_with_paths(tree, is_leaf=is_adapter_leaf)
    out = []
    for path, leaf in flat:
        if is_node(leaf):
            state = leaf.states.get(name)
            if isinstance(state, SVDState) and state.a is not None:
                out.append((path, leaf))
    return out


def _parts(node, name):
    state = node.states[name]
    return {"a": state.a, "b": state.b, "e": state.e}


def _n_modules(node, name) -> int:
    """Modules this node counts for: one per layer slice of a stacked kernel."""
    return int(math.prod(node.states[name].e.shape[:-1]))


# ------------------------------------------------------------------------------------------
# the allocator's pure functions

class AdaLoRAState(NamedTuple):
    """The allocator's carried state (a pytree).

    ``ipt`` / ``unc``: ``{path: {"a", "b", "e"}}``, the smoothed importance I_bar and its
    uncertainty U_bar, shaped like the factors; ``keep``: ``{path: bool stack + (r,)}``, the last
    rank pattern (all True until the first masking; frozen after ``T - tfinal``).
    """

    ipt: dict
    unc: dict
    keep: dict


def budget_schedule(spec: AdaLoRA, step: int, init_budget: int, target_budget: int):
    """PEFT's ``RankAllocator.budget_schedule`` (Python ints and floats, exactly): ``(budget, mask)``."""
    tinit, tfinal, total = spec.tinit, spec.tfinal, spec.total_steps
    if step <= tinit:
        return init_budget, False
    if step > total - tfinal:
        return target_budget, True
    mul_coeff = 1 - (step - tinit) / (total - tfinal - tinit)
    budget = int((init_budget - target_budget) * (mul_coeff ** 3) + target_budget)
    return budget, step % spec.delta_t == 0


def update_importance(ipt: dict, unc: dict, params: dict, grads: dict, beta1: float, beta2: float):
    """``I = |w * g|``; ``I_bar <- b1 I_bar + (1-b1) I``; ``U_bar <- b2 U_bar + (1-b2) |I - I_bar|``
    (``{path: {"a", "b", "e"}}`` dicts). Returns the new ``(ipt, unc)``."""
    new_ipt, new_unc = {}, {}
    for path in ipt:
        new_ipt[path], new_unc[path] = {}, {}
        for k in ipt[path]:
            i = jnp.abs(params[path][k] * grads[path][k]).astype(ipt[path][k].dtype)
            m = beta1 * ipt[path][k] + (1 - beta1) * i
            new_ipt[path][k] = m
            new_unc[path][k] = beta2 * unc[path][k] + (1 - beta2) * jnp.abs(i - m)
    return new_ipt, new_unc


def triplet_scores(ipt: dict, unc: dict, layouts: Mapping[str, Layout]) -> dict:
    """``{path: S}`` with ``S_i = s(E_i) + (mean_j s(A_ji) + mean_j s(B_ij))``, ``s = I_bar * U_bar``,
    shape stack + (r,): the means run over the kernel's input (A) and output (B) axes."""
    out = {}
    for path, lay in layouts.items():
        s_a = ipt[path]["a"] * unc[path]["a"]
        s_b = ipt[path]["b"] * unc[path]["b"]
        s_e = ipt[path]["e"] * unc[path]["e"]
        st = lay.stack
        mean_a = jnp.mean(s_a, axis=tuple(range(st, st + lay.inputs)))
        mean_b = jnp.mean(s_b, axis=tuple(range(st + 1, st + 1 + lay.outputs)))
        out[path] = s_e + (mean_a + mean_b)
    return out


def mask_threshold(scores: dict, k):
    """The ``k``-th smallest triplet score over all modules (``torch.kthvalue``); ``-inf`` for
    ``k <= 0`` (nothing to mask; PEFT's ``kthvalue`` would raise there)."""
    flat = jnp.concatenate([jnp.ravel(s) for s in scores.values()])
    ordered = jnp.sort(flat)
    k = jnp.asarray(k, jnp.int32)
    value = ordered[jnp.clip(k - 1, 0, flat.shape[0] - 1)]
    return jnp.where(k > 0, value, jnp.array(-jnp.inf, value.dtype))


def orthogonal_regularizer(trainable, name: str = "default"):
    """``mean over all A and B of ||A A^T - I||_F`` / ``||B^T B - I||_F`` (PyTorch layout; here
    ``a^T a`` and ``b b^T``, both r x r), one A and one B per module and per layer slice of a
    stacked kernel. The Frobenius norm, not squared, as PEFT. 0 when there are no modules."""
    total, count = jnp.zeros((), jnp.float32), 0
    hi = lax.Precision.HIGHEST
    for _, node in _modules(trainable, name):
        lay = node.layout
        a, b = node.states[name].a.astype(jnp.float32), node.states[name].b.astype(jnp.float32)
        stack, r = a.shape[:lay.stack], a.shape[-1]
        a2 = a.reshape(stack + (-1, r))
        b2 = b.reshape(stack + (r, -1))
        eye = jnp.eye(r, dtype=jnp.float32)
        gram_a = jnp.einsum("...ir,...is->...rs", a2, a2, precision=hi)
        gram_b = jnp.einsum("...ro,...so->...rs", b2, b2, precision=hi)
        total = total + jnp.sum(_fro(gram_a - eye)) + jnp.sum(_fro(gram_b - eye))
        count += 2 * int(math.prod(stack))
    return total / count if count else total


def _fro(x):
    """Frobenius norm over the last two axes with a finite gradient at 0 (torch's norm has one)."""
    sq = jnp.sum(x * x, axis=(-2, -1))
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


@dataclasses.dataclass(frozen=True)
class AdaLoRAAllocator:
    """AdaLoRA's rank allocator as a ``make_step(adapter_update=...)`` hook: ``init(trainable)``,
    ``loss(trainable)`` (the orthogonality regulariser, added to the loss) and the pure
    ``update(state, trainable, grads, step) -> (trainable, state, metrics)`` that the jitted step
    runs after the optimizer. Build it with :func:`adalora_allocator`.

    Metrics: ``adalora_budget`` (``b(t)``), ``adalora_rank`` (non-zero singular values over all
    modules after this step), ``adalora_threshold`` (the masking threshold, NaN on steps that do
    not mask).
    """

    spec: AdaLoRA
    name: str = "default"

    metric_names = ("adalora_budget", "adalora_rank", "adalora_threshold")

    def _mods(self, trainable):
        mods = _modules(trainable, self.name)
        if not mods:
            raise ValueError(f"no AdaLoRA adapter named {self.name!r} with trainable factors in this tree; pass the "
                             f"trainable half of jlora.partition(jlora.apply(params, jlora.AdaLoRA(...)))")
        return mods

    def budgets(self, trainable) -> tuple[int, int]:
        """``(b0, bT)``: total triplets at init (``sum r`` over modules) and the target budget."""
        mods = self._mods(trainable)
        b0 = sum(_n_modules(n, self.name) * n.states[self.name].a.shape[-1] for _, n in mods)
        return b0, self.spec.target_r * sum(_n_modules(n, self.name) for _, n in mods)

    def init(self, trainable) -> AdaLoRAState:
        mods = self._mods(trainable)
        zeros = {p: {k: jnp.zeros_like(v) for k, v in _parts(n, self.name).items()} for p, n in mods}
        keep = {p: jnp.ones(n.states[self.name].e.shape, bool) for p, n in mods}
        return AdaLoRAState(ipt=zeros, unc=jax.tree_util.tree_map(jnp.zeros_like, zeros), keep=keep)

    def loss(self, trainable):
        """``orth_reg_weight * orthogonal_regularizer(trainable)`` (0 when the weight is 0)."""
        if self.spec.orth_reg_weight == 0:
            return jnp.zeros((), jnp.float32)
        return self.spec.orth_reg_weight * orthogonal_regularizer(trainable, self.name)

    def update(self, state: AdaLoRAState, trainable, grads, step):
        """One step of PEFT's ``update_and_allocate(step)``, as a pure function (jittable; ``step``
        may be traced). ``trainable`` is after the optimizer update, ``grads`` the gradients it used."""
        spec, name = self.spec, self.name
        mods = self._mods(trainable)
        paths = [p for p, _ in mods]
        missing = [p for p in paths if p not in state.ipt]
        if missing:
            raise ValueError(f"allocator state has no entry for {missing[:3]}; build it with init() on this tree")
        gmods = dict(_modules(grads, name))
        params = {p: _parts(n, name) for p, n in mods}
        g = {p: _parts(gmods[p], name) for p in paths}
        layouts = {p: n.layout for p, n in mods}
        b0, bT = self.budgets(trainable)
        final_t = spec.total_steps - spec.tfinal
        table = np.array([budget_schedule(spec, t, b0, bT)[0] for t in range(final_t + 1)], np.int32)

        t = jnp.asarray(step, jnp.int32)
        in_mid = t < final_t
        at_final = t == final_t
        new_ipt, new_unc = update_importance(state.ipt, state.unc, params, g, spec.beta1, spec.beta2)
        pick = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(in_mid, n, o), new, old)
        ipt, unc = pick(new_ipt, state.ipt), pick(new_unc, state.unc)
        budget = jnp.where(t > final_t, bT, jnp.asarray(table)[jnp.clip(t, 0, final_t)])
        mask_now = (in_mid & (t > spec.tinit) & (t % spec.delta_t == 0)) | at_final

        def do_mask(_):
            scores = triplet_scores(ipt, unc, layouts)
            thr = mask_threshold(scores, b0 - budget)
            return {p: ~(scores[p] <= thr) for p in paths}, thr.astype(jnp.float32)

        def no_mask(_):
            return dict(state.keep), jnp.array(jnp.nan, jnp.float32)

        keep, thr = lax.cond(mask_now, do_mask, no_mask, None)
        apply_mask = mask_now | (t > final_t)
        new_e = {p: jnp.where(apply_mask & ~keep[p], jnp.zeros((), params[p]["e"].dtype), params[p]["e"])
                 for p in paths}
        reset = lambda tree: jax.tree_util.tree_map(lambda v: jnp.where(at_final, jnp.zeros_like(v), v), tree)
        state = AdaLoRAState(ipt=reset(ipt), unc=reset(unc), keep=keep)

        flat, treedef = flatten_with_paths(trainable, is_leaf=is_adapter_leaf)
        leaves = [leaf.with_(states={**leaf.states, name: leaf.states[name].replace(e=new_e[p])}) if p in new_e
                  else leaf for p, leaf in flat]
        trainable = jax.tree_util.tree_unflatten(treedef, leaves)
        rank = sum(jnp.sum(e != 0) for e in new_e.values()).astype(jnp.int32)
        metrics = {"adalora_budget": budget.astype(jnp.int32), "adalora_rank": rank, "adalora_threshold": thr}
        return trainable, state, metrics


def adalora_allocator(spec: AdaLoRA, name: str = "default") -> AdaLoRAAllocator:
    """The rank allocator of the AdaLoRA adapter ``name``, for ``jlora.train.make_step(...,
    adapter_update=...)`` (the state it carries: :class:`AdaLoRAState`).

    Example::

        alloc = jlora.adalora_allocator(spec)
        step = jlora.train.make_step(loss_fn, optax.adamw(1e-3), adapter_update=alloc)
        opt_state = jlora.train.init_opt_state(optax.adamw(1e-3), trainable, adapter_update=alloc)
    """
    if not isinstance(spec, AdaLoRA):
        raise TypeError(f"adalora_allocator needs a jlora.AdaLoRA spec, got {type(spec).__name__}")
    return AdaLoRAAllocator(spec, name)


# ------------------------------------------------------------------------------------------
# saving: keep only the triplets that survived

def _adalora_names(node):
    return [n for n, state in node.states.items() if isinstance(state, SVDState)]


def kept_ranks(adapted, name: str = "default") -> dict:
    """``{path: kept rank}`` of the AdaLoRA adapter ``name``: the number of non-zero singular
    values per module (a nested list, one entry per layer slice, for stacked kernels)."""
    out = {}
    flat, _ = flatten_with_paths(adapted, is_leaf=is_adapter_leaf)
    for path, leaf in flat:
        if is_node(leaf) and name in _adalora_names(leaf) and leaf.states[name].e is not None:
            counts = np.sum(np.asarray(leaf.states[name].e) != 0, axis=-1)
            out[path] = counts.tolist() if counts.ndim else int(counts)
    return out


def truncate(adapted, names=None):
    """Drops the masked triplets of every AdaLoRA adapter (all of them, or ``names``): A's
    columns, B's rows and E's entries where E is exactly zero. Each node keeps
    ``max(1, most kept in any layer slice)`` triplets, kept ones first in their original order
    (a stacked kernel's slices with fewer kept ranks are padded with zero singular values, which
    contribute nothing); the scale stays ``alpha / (init_r + 1e-5)`` as PEFT keeps ``ranknum``.
    A node whose E is all zero (never trained) is left as it is. Runs eagerly (shapes change).

    Example::

        small = jlora.methods.adalora.truncate(jlora.combine(trainable, frozen))
    """
    names = None if names is None else ((names,) if isinstance(names, str) else tuple(names))

    def one(leaf):
        if not is_node(leaf):
            return leaf
        for n in _adalora_names(leaf):
            if names is not None and n not in names:
                continue
            a, b, e = leaf.states[n].a, leaf.states[n].b, leaf.states[n].e
            if a is None or b is None or e is None:
                raise ValueError(f"truncate needs the full adapted tree (jlora.combine(trainable, frozen)); "
                                 f"{leaf.path!r} has no factors for {n!r}")
            keep = np.asarray(e) != 0
            if not keep.any():
                continue
            r = keep.shape[-1]
            r_new = max(1, int(keep.sum(-1).max()))
            if r_new == r:
                continue
            lay = leaf.layout
            order = np.argsort(~keep, axis=-1, kind="stable")[..., :r_new]
            stack = order.shape[:-1]
            a_idx = order.reshape(stack + (1,) * lay.inputs + (r_new,))
            b_idx = order.reshape(stack + (r_new,) + (1,) * lay.outputs)
            meta = dataclasses.replace(leaf.meta[n], rank=r_new)
            state = SVDState(a=jnp.take_along_axis(a, jnp.asarray(a_idx), axis=a.ndim - 1),
                             e=jnp.take_along_axis(e, jnp.asarray(order), axis=-1),
                             b=jnp.take_along_axis(b, jnp.asarray(b_idx), axis=lay.stack))
            leaf = leaf.with_(states={**leaf.states, n: state},
                              adapters=tuple((k, meta if k == n else m) for k, m in leaf.adapters))
        return leaf

    return jax.tree_util.tree_map(one, adapted, is_leaf=is_adapter_leaf)


def prepare_for_save(adapted, spec=None):
    """What ``jlora.io.save_adapter`` saves: ``(truncate(adapted), spec)``, with the kept ranks per
    module recorded as ``spec.rank_pattern`` when ``spec`` is an :class:`AdaLoRA`. Trees with no
    AdaLoRA adapter come back unchanged."""
    leaves = jax.tree_util.tree_leaves(adapted, is_leaf=is_adapter_leaf)
    if not any(is_node(l) and _adalora_names(l) for l in leaves):
        return adapted, spec
    if isinstance(spec, AdaLoRA):
        names = sorted({n for l in leaves if is_node(l) for n in _adalora_names(l)})
        pattern = {}
        for n in names:
            pattern.update({(p if n == "default" else f"{p}:{n}"): v for p, v in kept_ranks(adapted, n).items()})
        spec = copy.copy(spec)  # not dataclasses.replace: the fields are already normalised
        object.__setattr__(spec, "rank_pattern", tuple((k, _as_tuple(v)) for k, v in pattern.items()))
    return truncate(adapted), spec


# ------------------------------------------------------------------------------------------
# PEFT files: peft_type "ADALORA" (lora_A (k, in), lora_E (k, 1), lora_B (out, k) per module)

class AdaLoRACodec(peft_format.PeftCodec):
    """AdaLoRA as an ``AdaLoraConfig`` file: per module the k triplets whose singular value is
    non-zero, ``rank_pattern`` ``{"<module>.lora_E": kept mask over init_r}`` (PEFT resizes each
    module to it on load) and ``lora_alpha = scale * (init_r + 1e-5)`` (PEFT divides by
    ``ranknum = init_r``). Pass the :class:`AdaLoRA` spec to save_peft to record its schedule."""

    peft_type = "ADALORA"
    title = "AdaLoRA"
    kind = "adalora"
    solo = True

    def export(self, node, adapter, leaf_path, stack, n_in, n_out, embedding):
        """Per layer (lists for a stacked kernel: the kept rank k may differ per layer) ``lora_A``
        (k, in), ``lora_E`` (k, 1), ``lora_B`` (out, k), keeping the triplets whose singular value is
        non-zero (all of them when none is: an untrained adapter); ``info["mask"]``: the kept mask."""
        if embedding:
            raise ValueError(f"{leaf_path!r}: AdaLoRA on an embedding table has no PEFT form (PEFT's AdaLoRA adapts Linear)")
        state = node.states[adapter]
        if state.a is None or state.b is None or state.e is None:
            raise ValueError(f"save_peft needs the full adapted tree (jlora.combine(trainable, frozen)); "
                             f"{leaf_path!r} is missing the factors or singular values of adapter {adapter!r}")
        r = int(state.a.shape[-1])
        a = np.asarray(state.a).reshape((-1, n_in, r))
        b = np.asarray(state.b).reshape((-1, r, n_out))
        e = np.asarray(state.e).reshape((-1, r))
        out, infos = {"lora_A": [], "lora_E": [], "lora_B": []}, []
        for i in range(a.shape[0]):
            keep = e[i] != 0
            if not keep.any():
                keep = np.ones_like(keep)
            out["lora_A"].append(a[i].T[keep])
            out["lora_E"].append(e[i][keep][:, None])
            out["lora_B"].append(b[i].T[:, keep])
            infos.append({"mask": keep.tolist()})
        if not stack:
            return {k: v[0] for k, v in out.items()}, r, infos
        return out, r, infos

    def check_modules(self, modules):
        scales = {m.scale for m in modules.values()}
        if len(scales) > 1:
            raise ValueError(f"save_peft: AdaLoRA modules have different scales {sorted(scales)}; an AdaLoraConfig has "
                             f"one lora_alpha")

    def config(self, modules, ctx):
        names = list(modules)
        ada = ctx.spec if isinstance(ctx.spec, AdaLoRA) else None
        init_r = int(ada.init_r) if ada is not None else max(modules[m].rank for m in names)
        too_big = [m for m in names if modules[m].rank > init_r]
        if too_big:
            raise ValueError(f"save_peft: AdaLoRA module {too_big[0]!r} has rank {modules[too_big[0]].rank} > init_r {init_r}")
        scale = modules[names[0]].scale
        masks = {m: list(modules[m].info["mask"]) for m in names}
        rank_pattern = {f"{m}.lora_E": masks[m] + [False] * (init_r - len(masks[m])) for m in names}
        total = int(ada.total_steps) if ada is not None and ada.total_steps else 1
        return {
            "alpha_pattern": {}, "auto_mapping": None, **ctx.provenance,
            "beta1": float(ada.beta1) if ada else 0.85, "beta2": float(ada.beta2) if ada else 0.85, "bias": "none",
            "deltaT": int(ada.delta_t) if ada else 1, "exclude_modules": None, "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "init_r": init_r, "layers_pattern": None,
            "layers_to_transform": None, "lora_alpha": scale * (init_r + 1e-5),
            "lora_dropout": peft_format.most_common([modules[m].dropout for m in names]),
            "modules_to_save": ctx.modules_to_save or None,
            "orth_reg_weight": float(ada.orth_reg_weight) if ada else 0.5, "peft_type": "ADALORA", "r": 8,
            "rank_pattern": rank_pattern, "target_modules": ctx.target_modules,
            "target_r": int(ada.target_r) if ada else min(init_r, 8), "task_type": ctx.task_type,
            "tfinal": int(ada.tfinal) if ada else 0, "tinit": int(ada.tinit) if ada else 0, "total_step": total,
            "use_dora": False, "use_rslora": False,
        }

    def reads(self, config):
        return str(config.get("peft_type")).upper() == "ADALORA"

    def check_config(self, config, file):
        check_lora_config_fields(config, file)

    def load_warning(self, config):
        return init_changed_base_warning(config)

    def parse(self, key, value, modules, weights_file):
        m = re.fullmatch(r"(.+)\.lora_(A|B|E)", key)
        if m:
            modules[m.group(1)][m.group(2)] = value
            return True
        if re.fullmatch(r".+\.ranknum", key):   # PEFT's ranknum buffer: init_r, from the config
            return True
        if re.search(r"\.lora_[A-Za-z_]+\b", key):
            raise PeftFormatError(f"{weights_file}: unrecognised AdaLoRA tensor {key!r}")
        return False

    def check_parts(self, module, parts, weights_file):
        if "E" not in parts:
            raise PeftFormatError(f"{weights_file}: AdaLoRA module {module!r} has no lora_E")
        for part in ("A", "B"):
            if part not in parts:
                raise PeftFormatError(f"{weights_file}: module {module!r} has lora_{'AB'.replace(part, '')} but no lora_{part}")

    def build(self, target):
        """An SVDState from the modules' triplets; scale ``lora_alpha / (init_r + 1e-5)`` as PEFT's
        ``ranknum``. Layers of a stacked kernel with fewer kept triplets are padded with zero
        singular values."""
        config, names, weights_file = target.config, target.names, target.weights_file
        init_r = config.get("init_r", 12)
        if not isinstance(init_r, int) or init_r < 1:
            raise PeftFormatError(f"{weights_file}: AdaLoRA init_r must be a positive int, got {init_r!r}")
        pattern = config.get("rank_pattern") or {}
        for n in names:
            e, k = target.parts[n]["E"], target.parts[n]["A"].shape[0]
            if e.shape != (k, 1):
                raise PeftFormatError(f"{weights_file}: module {n!r}: lora_E has shape {tuple(e.shape)}, expected "
                                      f"({k}, 1) (one singular value per lora_A row)")
            mask = pattern.get(f"{n}.lora_E")
            if mask is not None and (len(mask) != init_r or sum(bool(v) for v in mask) != k):
                raise PeftFormatError(f"{weights_file}: module {n!r}: rank_pattern keeps {sum(bool(v) for v in mask)} "
                                      f"of {len(mask)} triplets, but the file holds {k} (init_r={init_r})")
            if k > init_r:
                raise PeftFormatError(f"{weights_file}: module {n!r} has {k} triplets > init_r={init_r}")
        alpha = config.get("lora_alpha", 8)
        scale = (alpha if alpha > 0 else init_r) / (init_r + RANKNUM_EPS)
        a, b, layout, rank, scale = read_lora_factors(target, fixed_scale=float(scale))
        singular = []
        for n in names:
            e = target.parts[n]["E"][:, 0]
            singular.append(np.concatenate([e, np.zeros(rank - e.shape[0], e.dtype)]))
        state = SVDState(a=a, e=jnp.asarray(peft_format.stack_layers(singular, target.stacked)), b=b)
        meta = AdapterMeta(method="adalora", rank=rank, scale=scale, dropout=_peft_dropout(config), init="peft")
        return peft_format.attach(target.leaf, target.leaf_path, layout, target.adapter, meta, state)


peft_format.register_peft_codec("adalora", AdaLoRACodec())
