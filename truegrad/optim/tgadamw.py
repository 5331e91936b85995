"""TGAdamW: AdamW whose second moment is the sum of squared per-sample gradients."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch.optim.optimizer import Optimizer, _get_foreach_kernels_supported_devices

from truegrad import statistic
from truegrad._validate import check_bool, check_number, describe
from truegrad.optim import _decay_hooks
from truegrad.optim._functional import _check_tensors, tgadamw
from truegrad.optim._helpers import _keep_float32_state
from truegrad.optim.weight_decay import WeightDecayBase, check_weight_decay_cls

__all__ = ["TGAdamW", "MissingStatisticError"]

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, torch.Tensor]]

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_true_sq")


class MissingStatisticError(ValueError):
    """A parameter has a gradient but no ``sum_grad_squared`` and ``default_to_adam=False``."""


class TGAdamW(Optimizer):
    r"""TrueGrad-AdamW (docs/statistic.md section 4).

    AdamW keeps a running mean of the squared *mean* gradient. TGAdamW keeps, in
    addition, a running mean of the *sum of squared per-sample gradients*
    :math:`s_t = \sum_n g_{t,n}^2`, read from ``p.sum_grad_squared`` (written during
    backward by a truegrad backend), and divides by its square root:

    .. math::
        \begin{aligned}
            & m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
              v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \qquad
              u_t = \beta_3 u_{t-1} + (1-\beta_3) s_t \\
            & a_t = \frac{m_t / (1-\beta_1^t)}{\max\big(\sqrt{v_t / (1-\beta_2^t)}, \epsilon\big)},
              \qquad
              \tau_t = \frac{m_t / (1-\beta_1^t)}{\max\big(\sqrt{u_t / (1-\beta_3^t)}, \epsilon\big)} \\
            & \textbf{if } \mathrm{graft}: \quad
              \tau_t \leftarrow \tau_t \, \frac{\lVert a_t \rVert_2}{\lVert \tau_t \rVert_2 + \epsilon}
              \quad \text{(norms per parameter tensor)} \\
            & \theta_t = \theta_{t-1} - \gamma \lambda \theta_{t-1} - \gamma \tau_t
        \end{aligned}

    with learning rate :math:`\gamma`, weight decay :math:`\lambda` (decoupled, applied
    once per step) and step :math:`t` counted per parameter. With ``graft=True`` the
    update has Adam's per-tensor norm and the TrueGrad statistic only decides its
    shape across coordinates, so the statistic's overall scale (mean versus sum loss,
    batch size) does not matter.

    A parameter with a gradient but without ``sum_grad_squared`` takes the AdamW update
    :math:`a_t` when ``default_to_adam=True`` ("Partial TrueGrad"); otherwise
    :meth:`step` raises :class:`MissingStatisticError` naming every such parameter,
    before any parameter is changed. Parameters without a gradient are skipped.

    Non-finite values are not replaced: the formula is evaluated with IEEE arithmetic
    as AdamW evaluates its own, so a NaN in a gradient or statistic makes the
    parameter NaN (the whole tensor when ``graft=True``), as a NaN gradient does in
    ``torch.optim.AdamW``.

    Args:
        params: parameters, ``named_parameters()`` pairs (the names then appear in
            error messages), or parameter groups.
        lr: learning rate :math:`\gamma`.
        betas: :math:`(\beta_1, \beta_2, \beta_3)`; a pair :math:`(\beta_1, \beta_2)`
            uses :math:`\beta_3 = \beta_2`.
        eps: :math:`\epsilon`, the floor of both denominators and of the grafting norm.
        weight_decay: decoupled weight decay :math:`\lambda`.
        graft: rescale the TrueGrad update to the AdamW update's norm, per tensor.
        default_to_adam: give parameters without a statistic the AdamW update
            instead of raising.
        foreach: use the multi-tensor (``torch._foreach_*``) implementation; ``False``
            the single-tensor loop (on CPU in cache-sized chunks). ``None`` chooses as
            ``torch.optim.AdamW`` does: foreach on CUDA and the like, the single-tensor
            loop on the CPU (the fastest path there that needs no compiler; no C is
            compiled unless ``fused=True`` asks for it).
        maximize: maximise the objective instead of minimising it.
        fused: use the fused implementation: on the CPU a small C kernel (OpenMP; two
            passes per grafted parameter, about 1.9x ``AdamW(fused=True)``) compiled with
            the system C compiler on first use (about a second, cached on disk under the
            torch extensions directory), or the ``torch.compile`` kernels where no
            compiler works; on other devices ``torch.compile`` kernels (one kernel pair per
            parameter, compiled once per process). ``None`` means ``False``.
        default_to_baseline: the later name of ``default_to_adam`` (original TrueGrad
            5.0.0); ``None``: not given. ``default_to_adam=True`` with
            ``default_to_baseline=False`` is a ``ValueError``.
        enforce_baseline: give every parameter the AdamW update, statistic or not
            (original TrueGrad 5.0.0).
        weight_decay_cls: a decay variant of :mod:`truegrad.optim.weight_decay`
            (:math:`\theta \leftarrow \theta - \gamma\lambda d(\theta)` once per parameter
            and step, before the update), or ``None`` for :math:`d(\theta) = \theta`.

    State per parameter: ``step`` (a 0-d CPU float32 tensor, as in ``torch.optim.Adam``),
    ``exp_avg`` (m), ``exp_avg_sq`` (v) and, once a statistic was seen,
    ``exp_avg_true_sq`` (u). State of bf16/fp16 parameters is kept in float32, also
    across ``load_state_dict``.

    Example::

        >>> import torch
        >>> from truegrad import nn
        >>> from truegrad.optim import TGAdamW
        >>> model = torch.nn.Sequential(nn.Linear(3, 4), torch.nn.ReLU(), nn.Linear(4, 1))
        >>> optim = TGAdamW(model.parameters())
        >>> model(torch.randn(8, 3)).mean().backward()
        >>> optim.step()
        >>> optim.zero_grad()
        >>> model[0].weight.sum_grad_squared is None
        True
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float, float] | tuple[float, float] = (0.9, 0.999, 0.999),
        eps: float = 1e-12,
        weight_decay: float = 1e-2,
        graft: bool = True,
        default_to_adam: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        *,
        fused: bool | None = None,
        default_to_baseline: bool | None = None,
        enforce_baseline: bool = False,
        weight_decay_cls: WeightDecayBase | None = None,
    ) -> None:
        defaults = _check_hyperparameters(
            dict(
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                graft=graft,
                default_to_adam=_alias_default_to_adam(default_to_adam, default_to_baseline),
                foreach=foreach,
                maximize=maximize,
                fused=fused,
                enforce_baseline=enforce_baseline,
            )
        )
        chain = check_weight_decay_cls("TGAdamW", weight_decay_cls)
        # every group and parameter is checked by add_param_group (called per group by
        # torch's constructor) before it is added
        super().__init__(_check_params(params), defaults)
        _decay_hooks.install(self, chain)  # weight_decay_cls: see truegrad/optim/_decay_hooks.py

    # ------------------------------------------------------------------ groups/state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group as ``torch.optim.Optimizer.add_param_group`` does, after
        checking it: its parameters must be real (not complex) leaf tensors that appear once
        in the optimizer, and its hyperparameters (``lr``, ``betas``, ``eps``, ...) must be
        valid as in the constructor. A group that fails a check raises ``TypeError`` or
        ``ValueError`` naming the parameter or hyperparameter, and neither the optimizer
        nor ``param_group`` is changed."""
        if not isinstance(param_group, dict):
            raise TypeError(
                f"TGAdamW: param_group must be a dict with a 'params' entry, got {describe(param_group)}"
            )
        if "params" not in param_group:
            raise ValueError(
                "TGAdamW: param_group must have a 'params' entry (the tensors to optimize), "
                f"got a dict with keys {sorted(map(str, param_group))!r}"
            )
        params = _group_params(param_group["params"])
        self._check_group_params(params)
        values = {k: param_group[k] for k in _HYPERPARAMETERS if k in param_group}
        if "default_to_baseline" in param_group:  # the later name of default_to_adam
            values["default_to_adam"] = _alias_default_to_adam(
                param_group.get("default_to_adam", False), param_group["default_to_baseline"]
            )
        inherited = {k: self.defaults[k] for k in ("foreach", "fused") if k in self.defaults}
        values = _check_hyperparameters(values, inherited)
        # everything checked: normalise the group in place, as torch does
        param_group["params"] = params
        param_group.pop("default_to_baseline", None)
        param_group.update(values)
        super().add_param_group(param_group)

    def _check_group_params(self, params: list[Any]) -> None:
        """Check the entries of a new group (tensors or ``(name, tensor)`` pairs)."""
        first = sum(len(g["params"]) for g in self.param_groups)
        owner = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        seen: dict[int, int] = {}
        for j, entry in enumerate(params):
            name = None
            if isinstance(entry, tuple):
                if len(entry) != 2 or not isinstance(entry[0], str):
                    raise TypeError(
                        f"TGAdamW: params[{j}] must be a tensor or a (name, tensor) pair, got "
                        f"{describe(entry)}"
                    )
                name, entry = entry
            if not isinstance(entry, torch.Tensor):
                raise TypeError(
                    f"TGAdamW: params[{j}] must be a tensor or a (name, tensor) pair, got {describe(entry)}"
                )
            where = _describe(entry, first + j, name)
            if entry.is_complex():
                raise ValueError(
                    f"TGAdamW: {where} is complex ({entry.dtype}); TGAdamW optimizes real "
                    "floating-point parameters only (the statistic is real: the imaginary part "
                    "would be dropped). Keep the real and imaginary parts as two real parameters."
                )
            if not (entry.is_leaf or entry.retains_grad):
                raise ValueError(
                    f"TGAdamW: {where} is not a leaf tensor (it was computed from others); "
                    "optimize the tensors it was computed from, or a detached copy"
                )
            if id(entry) in seen:
                raise ValueError(
                    f"TGAdamW: {where} appears more than once in params (also at index "
                    f"{first + seen[id(entry)]}); give each parameter once"
                )
            if id(entry) in owner:
                raise ValueError(
                    f"TGAdamW: {where} is already in parameter group {owner[id(entry)]}; "
                    "a parameter belongs to one group only"
                )
            seen[id(entry)] = j

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "weight_decay_cls": self.__dict__.get("weight_decay_cls")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict calls this too, without the chain: keep the one there is
        chain = state.pop("weight_decay_cls", self.__dict__.get("weight_decay_cls"))
        super().__setstate__(state)
        _decay_hooks.install(self, chain)
        for group in self.param_groups:
            group.setdefault("graft", True)
            group.setdefault("default_to_adam", False)
            group.setdefault("enforce_baseline", False)
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("fused", None)
            group["betas"] = _validate_betas(group["betas"])
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=torch.float32)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state as ``torch.optim.Optimizer`` does, keeping float32 moments of
        low-precision parameters in float32 (torch's loader casts them to the
        parameter's dtype, which would lose bits)."""
        super().load_state_dict(state_dict)
        _keep_float32_state(self, state_dict, _STATE_KEYS)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients as ``torch.optim.Optimizer`` does, and always clear
        ``sum_grad_squared`` of every parameter of this optimizer (set to ``None``)."""
        super().zero_grad(set_to_none=set_to_none)
        statistic.clear(p for group in self.param_groups for p in group["params"])

    # ------------------------------------------------------------------ step

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        stats: list[torch.Tensor | None],
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        exp_avg_true_sqs: list[torch.Tensor | None],
        state_steps: list[torch.Tensor],
    ) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.layout != torch.strided:
                self._refuse_sparse_gradients()
            state = self.state[p]
            state_dtype = statistic.statistic_dtype(p.dtype)
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
            stat = None if group["enforce_baseline"] else statistic.get(p)
            if stat is not None and "exp_avg_true_sq" not in state:
                state["exp_avg_true_sq"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            stats.append(stat)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            exp_avg_true_sqs.append(state.get("exp_avg_true_sq") if stat is not None else None)
            state_steps.append(state["step"])

    def _refuse_sparse_gradients(self) -> None:
        """Raise ``RuntimeError`` naming the first parameter with a sparse gradient (checked
        before anything is changed)."""
        index = 0
        for group in self.param_groups:
            names = group.get("param_names")
            for j, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.layout != torch.strided:
                    raise RuntimeError(
                        f"TGAdamW does not support sparse gradients: "
                        f"{_describe(p, index + j, names[j] if names else None)} has a "
                        f"{p.grad.layout} gradient. Give it a dense gradient (e.g. "
                        "torch.nn.Embedding(sparse=False)) or step it with torch.optim.SparseAdam."
                    )
            index += len(group["params"])

    def parameters_without_statistic(self, *, include_default_to_adam: bool = True) -> list[str]:
        """Describe every parameter that has a gradient but no ``sum_grad_squared``.

        Each entry reads ``"'<qualified name>' (index i, shape (..))"``, or
        ``"parameter (index i, shape (..))"`` when the optimizer was not given
        ``named_parameters()``. The index counts parameters across groups, as in
        ``state_dict()``.

        Args:
            include_default_to_adam: also list parameters of groups with
                ``default_to_adam=True`` (which take the AdamW update).
        """
        missing = []
        index = 0
        for group in self.param_groups:
            names = group.get("param_names")
            check = include_default_to_adam or not (group["default_to_adam"] or group["enforce_baseline"])
            for j, p in enumerate(group["params"]):
                if check and p.grad is not None and not statistic.has(p):
                    missing.append(_describe(p, index + j, names[j] if names else None))
            index += len(group["params"])
        return missing

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss; called first, with
                gradients enabled, before any gradient or statistic is read.

        Returns:
            The closure's loss, or ``None``.

        Raises:
            MissingStatisticError: a parameter has a gradient but no statistic and its
                group has ``default_to_adam=False``; no parameter is changed.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        self._refuse_sparse_gradients()
        missing = self.parameters_without_statistic(include_default_to_adam=False)
        if missing:
            raise MissingStatisticError(
                f"TGAdamW: {len(missing)} parameter(s) have a gradient but no sum_grad_squared: "
                + "; ".join(missing)
                + ". Compute the statistic for them with a truegrad backend (truegrad.nn "
                "modules, truegrad.utils.patch_torch(), truegrad.utils.patch_model() or the "
                "BackPack backend), or pass default_to_adam=True to give such parameters the "
                "AdamW update."
            )

        collected = []
        index = 0
        for group in self.param_groups:
            lists: tuple[list, ...] = ([], [], [], [], [], [], [])
            self._init_group(group, *lists)
            names = group.get("param_names")
            members = [  # (index across groups, name) of the parameters _init_group took
                (index + j, names[j] if names else None)
                for j, p in enumerate(group["params"])
                if p.grad is not None
            ]
            index += len(group["params"])
            describe = _describer(lists[0], members)
            collected.append((group, lists, describe))
        # every group checked before any steps: a bad tensor changes nothing
        for _, (params, grads, stats, exp_avgs, exp_avg_sqs, exp_avg_true_sqs, _), describe in collected:
            _check_tensors(params, grads, stats, exp_avgs, exp_avg_sqs, exp_avg_true_sqs, describe)

        for group, lists, describe in collected:
            params, grads, stats, exp_avgs, exp_avg_sqs, exp_avg_true_sqs, steps = lists
            if not params:
                continue
            foreach, fused = group["foreach"], group["fused"]
            if foreach is None and not fused:
                # torch's choice: foreach where its kernels exist; on the CPU the chunked
                # single-tensor loop (the fastest path that needs no compiler)
                foreach = _default_foreach(params)
            beta1, beta2, beta3 = group["betas"]
            tgadamw(
                params,
                grads,
                stats,
                exp_avgs,
                exp_avg_sqs,
                exp_avg_true_sqs,
                steps,
                foreach=bool(foreach),
                fused=bool(fused),
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                beta3=beta3,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                graft=group["graft"],
                maximize=group["maximize"],
                describe=describe,
            )
        return loss


def _default_foreach(params: list[torch.Tensor]) -> bool:
    """torch.optim's default choice (foreach where its kernels exist: CUDA and the like,
    not CPU), except that Parameter subclasses such as ``TrueGradParameter`` count as the
    tensors they are (torch's own check compares exact types and would refuse them)."""
    devices = _get_foreach_kernels_supported_devices()
    return not torch.jit.is_scripting() and all(
        p.device.type in devices and p.is_floating_point() for p in params
    )


def _describer(params: list[torch.Tensor], members: list[tuple[int, str | None]]) -> Callable[[int], str]:
    return lambda i: _describe(params[i], *members[i])


def _describe(p: torch.Tensor, index: int, name: str | None) -> str:
    where = f"index {index}, shape {tuple(p.shape)}"
    return f"{name!r} ({where})" if name else f"parameter {where}"


_HYPERPARAMETERS = (
    "lr", "betas", "eps", "weight_decay", "graft", "default_to_adam", "foreach", "maximize", "fused",
    "enforce_baseline",
)


def _alias_default_to_adam(default_to_adam: Any, default_to_baseline: Any) -> bool:
    """``default_to_adam`` and its later name ``default_to_baseline`` (``None``: not given). As
    ``default_to_adam`` defaults to ``False``, only ``default_to_adam=True`` with
    ``default_to_baseline=False`` is told apart as a conflict."""
    adam = check_bool("TGAdamW", "default_to_adam", default_to_adam)
    baseline = check_bool("TGAdamW", "default_to_baseline", default_to_baseline, allow_none=True)
    if baseline is None:
        return bool(adam)
    if adam and not baseline:
        raise ValueError(
            "TGAdamW: default_to_baseline and default_to_adam are two names of one switch "
            "(default_to_adam is its older name); give one, or both equal, got "
            f"default_to_baseline={default_to_baseline!r} and default_to_adam={default_to_adam!r}"
        )
    return bool(baseline)


def _check_hyperparameters(values: dict[str, Any], inherited: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check and normalise the hyperparameters in ``values`` (any subset of
    :data:`_HYPERPARAMETERS`); ``inherited`` holds the defaults a group's ``foreach`` and
    ``fused`` combine with."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key == "betas":
            out[key] = _validate_betas(value)
        elif key in ("lr", "eps", "weight_decay"):
            out[key] = check_number("TGAdamW", key, value, low=0.0)
        elif key in ("foreach", "fused"):
            out[key] = check_bool("TGAdamW", key, value, allow_none=True)
        else:
            out[key] = check_bool("TGAdamW", key, value)
    both = {**(inherited or {}), **out}
    if both.get("foreach") and both.get("fused"):
        raise ValueError(
            "TGAdamW: foreach and fused are mutually exclusive: set at most one to True, got "
            f"foreach={both['foreach']!r} and fused={both['fused']!r}"
        )
    return out


def _check_params(params: Any) -> list[Any]:
    """The constructor's ``params`` as a list (parameters, named pairs or group dicts);
    the entries are checked by :meth:`TGAdamW.add_param_group`."""
    expected = "an iterable of tensors, of (name, tensor) pairs or of parameter-group dicts"
    if isinstance(params, torch.Tensor):
        raise TypeError(f"TGAdamW: params must be {expected}, got {describe(params)}; pass [tensor]")
    if isinstance(params, (str, bytes, dict, set, frozenset)) or not isinstance(params, Iterable):
        why = "; sets have no order, use a list" if isinstance(params, (set, frozenset)) else ""
        raise TypeError(f"TGAdamW: params must be {expected}, got {describe(params)}{why}")
    entries = list(params)
    if not entries:
        raise ValueError(f"TGAdamW: params is empty (got {describe(params)}): nothing to optimize")
    return entries


def _group_params(params: Any) -> list[Any]:
    """A group's ``params`` as a list, as ``torch.optim.Optimizer.add_param_group`` makes it."""
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, (str, bytes, dict, set, frozenset)) or not isinstance(params, Iterable):
        why = "; sets have no order, use a list" if isinstance(params, (set, frozenset)) else ""
        raise TypeError(
            "TGAdamW: param_group['params'] must be a tensor or an iterable of tensors or of "
            f"(name, tensor) pairs, got {describe(params)}{why}"
        )
    return list(params)


def _validate_betas(betas: Any) -> tuple[float, float, float]:
    """``(beta1, beta2, beta3)`` from 2 or 3 floats in ``[0, 1)`` (``beta3 = beta2`` for 2)."""
    if not isinstance(betas, (tuple, list)):
        raise TypeError(
            f"TGAdamW: betas must be a tuple of 2 or 3 floats in [0, 1), got {describe(betas)}"
        )
    if len(betas) not in (2, 3):
        raise ValueError(
            "TGAdamW: betas must have 2 or 3 elements (beta1, beta2[, beta3]), got "
            f"{len(betas)}: {describe(betas)}"
        )
    checked = [
        check_number("TGAdamW", f"betas[{i}]", beta, low=0.0, high=1.0, high_inclusive=False)
        for i, beta in enumerate(betas)
    ]
    if len(checked) == 2:
        checked.append(checked[1])
    return cast(tuple[float, float, float], tuple(checked))
