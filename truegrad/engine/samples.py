"""Where the model's samples are in every tensor of a forward.

docs/statistic.md section 1: a sample is one index of dim 0 of the **model's** input, wherever the
model moves it. During the forward of a tracked model (:mod:`truegrad.engine.forward`) every
tensor computed from the model's input carries a tag saying where its samples are:

* a :class:`Layout` ``(dim, n, outer, inner)``: dim ``dim`` has size ``outer * n * inner``
  and its index ``i`` belongs to sample ``(i // inner) % n``. The plain case is ``outer =
  inner = 1`` (the samples are the indices of ``dim``); ``inner > 1`` is a flattening such as
  ``x.view(-1, D)`` of ``(N, T, D)`` (rows ``n*T:(n+1)*T`` are sample ``n``), ``outer > 1``
  one such as ``x.transpose(0, 1).reshape(-1, D)`` of ``(N, T, D)``, or ``x.repeat(2, 1)``;
* :class:`Lost`: the tensor carries the samples, but through an op whose effect on them this
  module does not know (or that mixes them: a sum over the batch). A parameter used with it
  gets no statistic, and the reason names that op;
* no tag: the tensor does not carry the batch (a buffer, ``torch.arange(T)``, a mask built
  from constants): it is a constant for every sample.

Tags are Python attributes of the tensor objects, valid for the forward that set them
(a tag from an earlier model call reads as no tag). :func:`propagate` is called for every
torch function of a tracked forward and tags its outputs from its inputs by a table of op
families (pointwise, views and reshapes, indexing, reductions, concatenation, products,
normalisations, attention, pooling ...). Everything outside the table that sees a tagged
input gives :class:`Lost` outputs: following the samples is never guessed.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from truegrad import _originals

__all__ = [
    "Layout",
    "Lost",
    "Packed",
    "Perm",
    "Tag",
    "current_epoch",
    "layout_of",
    "new_epoch",
    "propagate",
    "tag",
]

_ATTRIBUTE = "_truegrad_samples"
_EPOCHS = itertools.count(1)
_STATE = threading.local()


def new_epoch() -> int:
    """Start a new model call in this thread: tags of earlier calls stop counting."""
    epoch = next(_EPOCHS)
    _STATE.epoch = epoch
    return epoch


def current_epoch() -> int:
    return getattr(_STATE, "epoch", 0)


@dataclasses.dataclass(frozen=True, slots=True)
class Layout:
    """Samples along dim ``dim``: index ``i`` of it belongs to sample ``(i // inner) % n``.

    ``order`` names the order the samples are in: ``()`` the model's, else the permutations
    applied to it (``x.index_select(0, torch.sort(lengths).indices)`` of packed sequences).
    Tensors whose samples are in different orders are never combined sample by sample."""

    dim: int
    n: int
    outer: int = 1
    inner: int = 1
    order: tuple = ()

    @property
    def size(self) -> int:
        return self.outer * self.n * self.inner

    @property
    def plain(self) -> bool:
        return self.outer == 1 and self.inner == 1

    def at(self, dim: int) -> Layout:
        return dataclasses.replace(self, dim=dim)

    def permuted(self, token: tuple) -> Layout:
        """The layout after reordering the samples by the permutation ``token``."""
        return dataclasses.replace(self, order=_compose(self.order, token))

    def group(self, t: torch.Tensor, keep: int = 0) -> torch.Tensor:
        """``t`` as ``(n, P, *t.shape[t.dim() - keep:])``: samples first, every other dim but
        the last ``keep`` merged into the positions ``P`` of a sample (a view when possible).
        The samples must not be among the last ``keep`` dims."""
        lead = t.dim() - keep
        if not 0 <= self.dim < lead:
            raise ValueError(f"the samples (dim {self.dim}) are not among the leading dims of {tuple(t.shape)}")
        tail = tuple(t.shape[lead:])
        if self.plain and self.dim == 0:
            return t.reshape(self.n, -1, *tail)
        u = t.unflatten(self.dim, (self.outer, self.n, self.inner)).movedim(self.dim + 1, 0)
        return u.reshape(self.n, -1, *tail)

    def describe(self) -> str:
        extra = "" if self.plain else f" (flattened: {self.outer} x {self.n} x {self.inner})"
        return f"dim {self.dim}{extra}"


@dataclasses.dataclass(frozen=True, slots=True)
class Lost:
    """The tensor carries the samples through an op whose effect on them is not followed."""

    op: str

    def describe(self) -> str:
        return f"the batch went through {self.op}, which truegrad cannot follow per sample"


@dataclasses.dataclass(frozen=True, slots=True)
class Perm:
    """An index tensor whose values along dim ``dim`` are a permutation of ``0 .. n-1``
    (constant along its other dims): ``torch.arange(N)`` (``token == ()``), the indices of a
    sort of N values, their inverse. It carries no samples itself, but indexing the samples'
    dim with it (``x[torch.arange(N), i]``, Hugging Face's ``padding_mask[batch_idx,
    kv_idx]``, ``x.index_select(0, sorted_indices)``) keeps every sample whole, in the order
    the token names."""

    dim: int
    n: int
    token: tuple = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Packed:
    """The data of a ``PackedSequence`` of the model's samples: at each time step the rows
    of the samples still running, in the sorted order ``order``."""

    n: int
    order: tuple = ()


_PERMUTATIONS = itertools.count(1)


def _fresh() -> tuple:
    return (("p", next(_PERMUTATIONS)),)


def _inverse(token: tuple) -> tuple:
    return tuple(("q" if kind == "p" else "p", k) for kind, k in reversed(token))


def _compose(order: tuple, token: tuple) -> tuple:
    """``order`` followed by ``token``, a permutation and its inverse cancelling."""
    result = list(order)
    for step in token:
        kind, k = step
        if result and result[-1] == ("q" if kind == "p" else "p", k):
            result.pop()
        else:
            result.append(step)
    return tuple(result)


Tag = Layout | Lost | Perm | Packed


def layout_of(t: Any) -> Tag | None:
    """The tag of ``t`` in the current model call (``None``: no batch, or not a tensor)."""
    entry = getattr(t, _ATTRIBUTE, None) if isinstance(t, torch.Tensor) else None
    if entry is None or entry[0] != current_epoch():
        return None
    return entry[1]


def tag(t: torch.Tensor, value: Tag | None) -> None:
    """Set (or, with ``None``, clear) the tag of ``t`` for the current model call.

    With one sample (``n == 1``) every element belongs to it: the layout is normalised to
    dim 0 (``outer`` = its size), whatever dim the op put it in."""
    if value is None:
        if getattr(t, _ATTRIBUTE, None) is not None:
            setattr(t, _ATTRIBUTE, None)
        return
    if isinstance(value, Layout) and value.n == 1 and t.dim() > 0:
        value = Layout(0, 1, t.shape[0], 1)
    setattr(t, _ATTRIBUTE, (current_epoch(), value))


# ----------------------------------------------------------------------------- helpers


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, torch.Tensor):
                yield item


def _outputs(result: Any) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (list, tuple)):
        return [r for r in result if isinstance(r, torch.Tensor)]
    return []


def _name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    owner = getattr(func, "__self__", None)
    if name in ("__get__", "__set__") and owner is not None:
        return f"Tensor.{getattr(owner, '__name__', '?')}"
    qualname = getattr(func, "__qualname__", name)
    if qualname.startswith(("TensorBase.", "Tensor.")):
        return "Tensor." + qualname.split(".", 1)[1]
    module = getattr(func, "__module__", None) or "torch"
    if module.startswith("torch._C") or module in ("torch", "torch.functional"):
        module = {"torch._C._nn": "torch.nn.functional"}.get(module, "torch")
    return f"{module}.{name}"


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


class _Fail(Exception):
    """Raised inside a rule: the outputs are :class:`Lost`."""


# ----------------------------------------------------------------------------- rules
#
# A rule gets ``(func, args, kwargs, result, tagged)`` where ``tagged`` lists the
# ``(tensor, Layout)`` of the inputs that carry the batch (none is Lost: that is handled
# before), and returns a list of tags, one per output tensor (``None``: no batch), or
# raises _Fail.

Rule = Callable[[Any, tuple, dict, Any, list], list]


def _same(candidates: Sequence[Layout | None]) -> Layout | None:
    found = [c for c in candidates if c is not None]
    if not found:
        return None
    if any(c != found[0] for c in found[1:]):
        raise _Fail
    return found[0]


def _broadcast(t: torch.Tensor, layout: Layout, out: torch.Tensor) -> Layout | None:
    """Where ``t``'s samples are in ``out = broadcast(t, ...)`` (right-aligned)."""
    pos = layout.dim + out.dim() - t.dim()
    if pos < 0 or pos >= out.dim():
        raise _Fail
    if t.shape[layout.dim] == out.shape[pos]:
        return layout.at(pos)
    raise _Fail


def _pointwise(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
    outs = _outputs(result)
    tags = []
    for out in outs:
        tags.append(_same([_broadcast(t, lay, out) for t, lay in tagged]))
    return tags


def _first_only(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
    """Output shaped like the first argument and a function of it alone (``type_as``)."""
    first = args[0] if args else None
    own = [lay for t, lay in tagged if t is first]
    return [own[0] if own else None for _ in _outputs(result)]


def _reshape_layout(shape: Sequence[int], layout: Layout, out_shape: Sequence[int]) -> Layout:
    """The layout after a row-major reshape from ``shape`` to ``out_shape``."""
    if math.prod(shape) != math.prod(out_shape) or math.prod(shape) == 0:
        raise _Fail
    place = layout.inner * math.prod(shape[layout.dim + 1:])  # place value of the sample digit
    width = place * layout.n
    below = 1
    for m in range(len(out_shape) - 1, -1, -1):
        above = below * out_shape[m]
        if below <= place and width <= above and place % below == 0 and above % width == 0:
            inner = place // below
            outer = above // width
            return Layout(m, layout.n, outer, inner)
        below = above
    raise _Fail


def _shape_arg(args: tuple, kwargs: dict, start: int) -> list[int] | None:
    rest = args[start:]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple, torch.Size)):
        rest = tuple(rest[0])
    if not rest and "shape" in kwargs:
        rest = tuple(kwargs["shape"])
    if not rest and "size" in kwargs:
        rest = tuple(kwargs["size"])
    return list(rest) if rest else None


def _reshape(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
    source = args[0]
    own = [lay for t, lay in tagged if t is source]
    if not own:
        return [None for _ in _outputs(result)]
    out = _outputs(result)[0]
    if out.dim() == source.dim() and tuple(out.shape) == tuple(source.shape):
        return [own[0]]
    if out.dtype.itemsize != source.dtype.itemsize:  # view(dtype) with another element size
        raise _Fail
    return [_reshape_layout(tuple(source.shape), own[0], tuple(out.shape))]


def _dims_map(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
    """transpose / permute / movedim / squeeze / unsqueeze / t / expand / flatten ...:
    found by matching the moved dim (see _where)."""
    source = args[0]
    own = [lay for t, lay in tagged if t is source]
    others = [t for t, _ in tagged if t is not source]
    if others:
        raise _Fail
    if not own:
        return [None for _ in _outputs(result)]
    layout = own[0]
    name = getattr(func, "__name__", "")
    out = _outputs(result)[0]
    nd = source.dim()
    d = layout.dim
    if name in ("transpose", "swapaxes", "swapdims", "transpose_", "swapaxes_", "swapdims_"):
        a = _norm_dim(_arg(args, kwargs, 1, "dim0"), nd)
        b = _norm_dim(_arg(args, kwargs, 2, "dim1"), nd)
        return [layout.at(b if d == a else a if d == b else d)]
    if name in ("t", "t_", "__get__") or name == "numpy_T":
        if nd < 2:
            return [layout]
        if name == "__get__" and getattr(func.__self__, "__name__", "") == "mT":
            return [layout.at(nd - 1 if d == nd - 2 else nd - 2 if d == nd - 1 else d)]
        return [layout.at(nd - 1 - d)]
    if name == "permute":
        dims = _shape_arg(args, kwargs, 1) or list(kwargs.get("dims", ()))
        dims = [_norm_dim(x, nd) for x in dims]
        return [layout.at(dims.index(d))]
    if name in ("movedim", "moveaxis"):
        src = _arg(args, kwargs, 1, "source")
        dst = _arg(args, kwargs, 2, "destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        order = [None] * nd
        src = [_norm_dim(x, nd) for x in src]
        dst = [_norm_dim(x, nd) for x in dst]
        for s, t in zip(src, dst):
            order[t] = s
        rest = iter(x for x in range(nd) if x not in src)
        order = [o if o is not None else next(rest) for o in order]
        return [layout.at(order.index(d))]
    if name in ("unsqueeze", "unsqueeze_"):
        dim = _norm_dim(_arg(args, kwargs, 1, "dim"), nd + 1)
        return [layout.at(d + 1 if dim <= d else d)]
    if name in ("squeeze", "squeeze_"):
        dim = _arg(args, kwargs, 1, "dim")
        if dim is None:
            dims = [i for i in range(nd) if source.shape[i] == 1]
        else:
            dims = [dim] if isinstance(dim, int) else list(dim)
            dims = [_norm_dim(x, nd) for x in dims if source.shape[_norm_dim(x, nd)] == 1]
        if d in dims:
            raise _Fail
        return [layout.at(d - sum(1 for x in dims if x < d))]
    if name in ("expand", "expand_as", "broadcast_to"):
        return [_broadcast(source, layout, out)]
    if name in ("flatten", "unflatten", "ravel"):
        return [_reshape_layout(tuple(source.shape), layout, tuple(out.shape))]
    raise _Fail


def _dim_op(keeps_dim: bool, dim_index: int = 1, dim_name: str = "dim", full_reduce_ok: bool = False) -> Rule:
    """An op along one or more dims (reductions, softmax, cumsum, sort, flip ...): fine as
    long as those dims are not the samples' dim."""

    def rule(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
        source = args[0] if args else kwargs.get("input")
        own = [lay for t, lay in tagged if t is source]
        if any(t is not source for t, _ in tagged):
            raise _Fail
        if not own:
            return [None for _ in _outputs(result)]
        layout = own[0]
        nd = source.dim()
        dim = _arg(args, kwargs, dim_index, dim_name)
        if isinstance(dim, torch.Tensor):  # torch.max(a, b): elementwise
            return _pointwise(func, args, kwargs, result, tagged)
        if dim is None:
            raise _Fail  # over everything (or an implicit dim): the samples are mixed
        dims = [dim] if isinstance(dim, int) else list(dim)
        dims = [_norm_dim(x, nd) for x in dims]
        if layout.dim in dims:
            raise _Fail
        tags: list = []
        for out in _outputs(result):
            if keeps_dim or out.dim() == nd:
                tags.append(layout)
            else:
                tags.append(layout.at(layout.dim - sum(1 for x in dims if x < layout.dim)))
        return tags

    return rule


def _perm_of(t: Any) -> Perm | None:
    entry = getattr(t, _ATTRIBUTE, None) if isinstance(t, torch.Tensor) else None
    if entry is None or entry[0] != current_epoch() or not isinstance(entry[1], Perm):
        return None
    return entry[1]


def _narrowing(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
    """split / chunk / unbind / narrow / select / tensor_split / index_select along a dim."""
    source = args[0]
    own = [lay for t, lay in tagged if t is source]
    if any(t is not source for t, _ in tagged):
        raise _Fail
    if not own:
        return [None for _ in _outputs(result)]
    layout = own[0]
    name = getattr(func, "__name__", "")
    nd = source.dim()
    index = {"split": 2, "chunk": 2, "unbind": 1, "narrow": 1, "select": 1, "tensor_split": 2,
             "split_with_sizes": 2, "index_select": 1, "unfold": 1}.get(name, 1)
    default = 0
    dim = _arg(args, kwargs, index, "dim", default)
    if name == "unfold":
        dim = _arg(args, kwargs, 1, "dimension")
    dim = _norm_dim(dim, nd)
    if dim == layout.dim:
        index = _arg(args, kwargs, 2, "index")
        perm = _perm_of(index) if name == "index_select" else None
        if perm is None or perm.n != layout.n or not layout.plain or index.dim() != 1:
            raise _Fail
        return [layout.permuted(perm.token)]
    removes = name in ("unbind", "select")
    d = layout.dim - (1 if removes and dim < layout.dim else 0)
    return [layout.at(d) for _ in _outputs(result)]


def _gather(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
    """gather / take_along_dim / scatter along a dim: the index (and src) must carry the
    samples like the input (or not at all) and the dim must not be the samples'."""
    source = args[0]
    nd = source.dim()
    dim = _norm_dim(_arg(args, kwargs, 1, "dim"), nd)
    out = _outputs(result)[0]
    layouts = [lay for _, lay in tagged]
    layout = _same(layouts)
    if layout is None:
        return [None]
    if layout.dim == dim or any(t.dim() != nd for t, _ in tagged) or out.dim() != nd:
        raise _Fail
    if out.shape[layout.dim] != layout.size:
        raise _Fail
    if source.shape[layout.dim] != layout.size and not any(t is source for t, _ in tagged):
        raise _Fail
    return [layout]


def _cat(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
    tensors = list(_tensors(args[0] if args else kwargs.get("tensors")))
    name = getattr(func, "__name__", "")
    dim = _arg(args, kwargs, 1, "dim", 0)
    stack = name == "stack"
    if name in ("hstack", "vstack", "dstack", "column_stack", "row_stack"):
        raise _Fail
    by_id = {id(t): lay for t, lay in tagged}
    layouts = [by_id.get(id(t)) for t in tensors]
    if stack:
        dim = _norm_dim(dim, tensors[0].dim() + 1)
        shifted = [None if lay is None else lay.at(lay.dim + (1 if dim <= lay.dim else 0))
                   for lay in layouts]
        return [_same(shifted)]
    ref = next(t for t in tensors if t.dim() > 0)
    dim = _norm_dim(dim, ref.dim())
    present = [lay for lay in layouts if lay is not None]
    if not present:
        return [None]
    if any(lay.dim == dim for lay in present):
        # Concatenating batches along the samples' dim: fine when every piece is a whole
        # batch in the same layout (rows of every piece follow the same sample pattern).
        first = present[0]
        if len(present) != len(tensors) or any(
            lay.n != first.n or lay.inner != first.inner or lay.dim != first.dim for lay in present
        ):
            raise _Fail
        outer = sum(lay.outer for lay in present)
        return [Layout(dim, first.n, outer, first.inner)]
    return [_same(present)]


def _where_index(source: torch.Tensor, index: Any, layout: Layout) -> Layout:
    """Position of the samples' dim after basic indexing ``source[index]``."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, bool) or (isinstance(i, torch.Tensor) and i.dtype == torch.bool) for i in items):
        raise _Fail
    advanced = [k for k, i in enumerate(items) if isinstance(i, (torch.Tensor, list))]
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis and not isinstance(i, bool))
    nd = source.dim()
    expanded: list[Any] = []
    for item in items:
        if item is Ellipsis:
            expanded.extend([slice(None)] * (nd - consumed))
        else:
            expanded.append(item)
    if Ellipsis not in items:
        expanded.extend([slice(None)] * (nd - consumed))
    in_dim = 0
    out_pos = 0
    if advanced:
        # Only the simple case: every advanced index after the samples' dim and adjacent.
        positions = [k for k, i in enumerate(expanded) if isinstance(i, (torch.Tensor, list))]
        if positions != list(range(positions[0], positions[0] + len(positions))):
            raise _Fail
    for item in expanded:
        if item is None:
            out_pos += 1
            continue
        if in_dim == layout.dim:
            if isinstance(item, slice) and item == slice(None):
                return layout.at(out_pos)
            if isinstance(item, slice):
                start, stop, step = item.indices(source.shape[in_dim])
                if start == 0 and stop == source.shape[in_dim] and step == 1:
                    return layout.at(out_pos)
            raise _Fail
        if isinstance(item, (torch.Tensor, list)):
            raise _Fail  # an advanced index before the samples: positions move
        if isinstance(item, slice):
            out_pos += 1
        in_dim += 1
    raise _Fail


def _advanced(source: torch.Tensor, index: Any, layout: Layout, tagged: list, out: torch.Tensor) -> Layout:
    """``source[index]`` with advanced (tensor) indices where the samples' dim is indexed by a
    :class:`Perm` (``x[torch.arange(N), positions]``): every output row stays one sample."""
    items = list(index) if isinstance(index, tuple) else [index]
    if not layout.plain or any(i is None or isinstance(i, bool) for i in items):
        raise _Fail
    consumed = sum(1 for i in items if i is not Ellipsis)
    expanded: list[Any] = []
    for item in items:
        if item is Ellipsis:
            expanded.extend([slice(None)] * (source.dim() - consumed))
        else:
            expanded.append(item)
    expanded.extend([slice(None)] * (source.dim() - len(expanded)))
    advanced = [k for k, i in enumerate(expanded) if isinstance(i, (torch.Tensor, list, int))]
    if layout.dim not in advanced:
        raise _Fail
    index_at = expanded[layout.dim]
    if not isinstance(index_at, torch.Tensor):
        raise _Fail
    entry = getattr(index_at, _ATTRIBUTE, None)
    if entry is None or entry[0] != current_epoch() or not isinstance(entry[1], Perm) or entry[1].n != layout.n:
        raise _Fail
    token = entry[1].token
    tensors = [i if isinstance(i, torch.Tensor) else torch.as_tensor(i) for k, i in enumerate(expanded) if k in advanced]
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    k = entry[1].dim + len(shape) - index_at.dim()
    if shape[k] != layout.n:
        raise _Fail
    by_id = {id(t): lay for t, lay in tagged}
    for t in tensors:
        lay = by_id.get(id(t))
        if lay is not None and (not lay.plain or lay.dim + len(shape) - t.dim() != k):
            raise _Fail
    adjacent = advanced == list(range(advanced[0], advanced[0] + len(advanced)))
    before = sum(1 for i in expanded[: advanced[0]] if isinstance(i, slice)) if adjacent else 0
    result = Layout(before + k, layout.n, order=_compose(layout.order, token))
    if out.shape[result.dim] != layout.n:
        raise _Fail
    return result


def _getitem(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
    source, index = args[0], args[1]
    own = [lay for t, lay in tagged if t is source]
    items = list(index) if isinstance(index, tuple) else [index]
    if own and any(isinstance(i, (torch.Tensor, list)) for i in items):
        return [_advanced(source, index, own[0], tagged, _outputs(result)[0])]
    if any(t is not source for t, _ in tagged) or not own:
        if not own and not any(t is source for t, _ in tagged) and tagged:
            raise _Fail  # a batched index into a constant
        return [None]
    return [_where_index(source, index, own[0])]


def _setitem(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
    target, index, value = args[0], args[1], args[2] if len(args) > 2 else None
    target_layout = next((lay for t, lay in tagged if t is target), None)
    value_layout = next((lay for t, lay in tagged if t is value), None)
    others = [t for t, _ in tagged if t is not target and t is not value]
    if others:
        raise _Fail
    if value_layout is not None:
        part_shape = _indexed_shape(target, index)
        wanted = _broadcast_shape(value, value_layout, part_shape)
        if target_layout is None:
            # a constant filled with batched values (``shifted[:, 1:] = ids[:, :-1]``): the
            # target carries the samples where a whole dim of it receives the value's
            candidates = [
                d for d in range(target.dim())
                if target.shape[d] == value_layout.size and _maps(target, index, d, value_layout) == wanted
            ]
            if len(candidates) != 1:
                tag(target, Lost("Tensor.__setitem__"))
                return []
            target_layout = dataclasses.replace(value_layout, dim=candidates[0])
        elif _maps(target, index, target_layout.dim, target_layout) != wanted:
            tag(target, Lost("Tensor.__setitem__"))
            return []
    tag(target, target_layout)
    return []


def _indexed_shape(target: torch.Tensor, index: Any) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(torch.empty(target.shape, device="meta")[index].shape)


def _broadcast_shape(value: torch.Tensor, layout: Layout, shape: tuple[int, ...]) -> Layout:
    pos = layout.dim + len(shape) - value.dim()
    if not 0 <= pos < len(shape) or shape[pos] != value.shape[layout.dim]:
        raise _Fail
    return layout.at(pos)


def _maps(target: torch.Tensor, index: Any, dim: int, layout: Layout) -> Layout | None:
    try:
        return _where_index(target, index, dataclasses.replace(layout, dim=dim))
    except _Fail:
        return None


def _products(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
    from truegrad.nn.rules import matmul as _matmul

    kind = _matmul.MATMUL_OPS.get(func) or _EXTRA_PRODUCTS.get(func)
    if kind == "baddbmm":
        c = _matmul.contraction("bmm", args[1:3], {})
        bias = args[0]
    else:
        c = _matmul.contraction(kind, args, kwargs)
        bias = c.bias if c is not None else None
    if c is None:
        raise _Fail
    out = _outputs(result)[0]
    letters: list[tuple[str, Layout]] = []
    for operand, term in zip(c.operands, c.terms):
        lay = next((lay for t, lay in tagged if t is operand), None)
        if lay is not None:
            letters.append((term[lay.dim], lay))
    found = None
    for letter, lay in letters:
        if letter not in c.output:
            raise _Fail  # summed over the samples
        candidate = lay.at(c.output.index(letter))
        if found is not None and candidate != found:
            raise _Fail
        found = candidate
    if bias is not None:
        lay = next((lay for t, lay in tagged if t is bias), None)
        if lay is not None:
            candidate = _broadcast(bias, lay, out)
            if found is not None and candidate != found:
                raise _Fail
            found = candidate
    if found is not None and out.shape[found.dim] != found.size:
        raise _Fail
    return [found]


def _leading(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list, trailing: int = 1,
             first_arg_only: bool = False) -> list:
    """Ops that act on the last ``trailing`` dims and keep the leading ones (linear,
    layer_norm, embedding's output gets one more trailing dim ...)."""
    source = args[0] if args else kwargs.get("input")
    own = next((lay for t, lay in tagged if t is source), None)
    others = [lay for t, lay in tagged if t is not source]
    if own is None:
        if others:
            raise _Fail
        return [None for _ in _outputs(result)]
    if first_arg_only and others:
        raise _Fail
    if own.dim >= source.dim() - trailing:
        raise _Fail
    tags = []
    for out in _outputs(result):
        if out.dim() < own.dim + 1 or out.shape[own.dim] != own.size:
            raise _Fail
        tags.append(own)
    return tags


def _linear(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
    return _leading(func, args, kwargs, result, tagged, trailing=1, first_arg_only=True)


def _layer_norm(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
    shape = _arg(args, kwargs, 1, "normalized_shape")
    trailing = 1 if isinstance(shape, int) else len(tuple(shape))
    return _leading(func, args, kwargs, result, tagged, trailing=trailing, first_arg_only=True)


def _embedding(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
    source = args[0] if args else kwargs.get("input")
    own = next((lay for t, lay in tagged if t is source), None)
    if own is None or any(t is not source for t, _ in tagged):
        if tagged and own is None:
            raise _Fail
        return [None]
    return [own]


def _bilinear(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
    """F.bilinear(input1, input2, weight, bias): both inputs share their leading dims."""
    first, second = _arg(args, kwargs, 0, "input1"), _arg(args, kwargs, 1, "input2")
    layouts = {id(t): lay for t, lay in tagged}
    if any(id(t) not in (id(first), id(second)) for t, _ in tagged):
        raise _Fail
    found = _same([layouts.get(id(first)), layouts.get(id(second))])
    if found is None:
        return [None]
    if found.dim >= first.dim() - 1:
        raise _Fail
    return [found]


def _like_first(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
    """Output shaped like the first argument, elementwise in it, with the other arguments
    (a per-channel weight) carrying no samples: ``prelu``."""
    source = _arg(args, kwargs, 0, "input")
    own = next((lay for t, lay in tagged if t is source), None)
    if any(t is not source for t, _ in tagged):
        raise _Fail
    return [own for _ in _outputs(result)]


def _embedding_bag(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
    """F.embedding_bag(input, weight, offsets, ...): one output row per bag; the bags are the
    samples when the rows of a 2-D input are, or when the offsets carry them."""
    source = _arg(args, kwargs, 0, "input")
    offsets = _arg(args, kwargs, 2, "offsets")
    out = _outputs(result)[0]
    by_id = {id(t): lay for t, lay in tagged}
    if isinstance(source, torch.Tensor) and source.dim() == 2:
        carrier = by_id.get(id(source))
    else:
        carrier = by_id.get(id(offsets)) if isinstance(offsets, torch.Tensor) else None
    if carrier is None or carrier != Layout(0, carrier.n) or out.shape[0] != carrier.n:
        raise _Fail
    return [carrier]


def _leading_batch(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
    """Ops whose dim 0 is the batch by their own definition (convolutions, pooling,
    group/instance/batch norm, interpolation, pixel shuffle ...): the samples must be
    exactly dim 0 of the input, and then they are dim 0 of every output."""
    source = args[0] if args else kwargs.get("input")
    own = next((lay for t, lay in tagged if t is source), None)
    if any(t is not source for t, lay in tagged if lay != Layout(0, lay.n)):
        raise _Fail
    if own is None:
        if tagged:
            raise _Fail
        return [None for _ in _outputs(result)]
    if own != Layout(0, own.n):
        raise _Fail
    weight = _arg(args, kwargs, 1, "weight")
    name = getattr(func, "__name__", "")
    if name.startswith("conv") and isinstance(weight, torch.Tensor) and source.dim() != weight.dim():
        raise _Fail  # an unbatched convolution: dim 0 is channels
    return [own if out.dim() > 0 and out.shape[0] == own.n else _raise() for out in _outputs(result)]


def _raise() -> Any:
    raise _Fail


def _attention(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
    """scaled_dot_product_attention(q, k, v, attn_mask): samples in a leading dim, shared
    by every batched input (masks may broadcast)."""
    out = _outputs(result)[0]
    found = None
    for t, lay in tagged:
        if lay.dim >= t.dim() - 2:
            raise _Fail
        candidate = _broadcast(t, lay, out)
        if found is not None and candidate != found:
            raise _Fail
        found = candidate
    return [found]


def _mha(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
    """F.multi_head_attention_forward(query (L, N, E) ...): batch on dim 1 (or unbatched)."""
    query = args[0] if args else kwargs.get("query")
    if query.dim() != 3:
        raise _Fail  # unbatched attention: its rows (the samples) attend to each other
    found = None
    for t, lay in tagged:
        if t is query or (t.dim() == 3 and lay.dim == 1):
            if t.dim() != 3 or lay.dim != 1 or not lay.plain:  # query, key, value (L, N, E)
                raise _Fail
        elif t.dim() == 3:  # attn_mask, static_k, static_v: (N * H, ., .), samples outermost
            if lay.dim != 0 or lay.outer != 1:
                raise _Fail
        elif t.dim() != 2 or lay.dim != 0:  # key_padding_mask (N, S)
            raise _Fail
        if t is query:
            found = lay
    if found is None and tagged:
        raise _Fail
    tags = []
    for out in _outputs(result):
        if out is None:
            continue
        if found is None:
            tags.append(None)
        elif out.dim() == 3 and out.shape[1] == found.size:
            tags.append(found)  # output (L, N, E)
        elif out.dim() >= 2 and out.shape[0] == found.size:
            tags.append(found.at(0))  # attention weights (N, L, S)
        else:
            raise _Fail
    return tags


def _recurrent(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
    """torch.lstm / gru / rnn_* (input, hx, params, has_biases, num_layers, dropout, train,
    bidirectional, batch_first): output batch on dim 0 or 1, states on dim 1."""
    source = args[0]
    own = next((lay for t, lay in tagged if t is source), None)
    if own is None or not isinstance(args[1], (torch.Tensor, list, tuple)):
        if tagged:
            raise _Fail
        return [None for _ in _outputs(result)]
    if len(args) > 8 and isinstance(args[8], bool):
        batch_first = args[8]
        if not own.plain or own.dim != (0 if batch_first else 1) or source.dim() != 3:
            raise _Fail
        outs = _outputs(result)
        return [own] + [own.at(1) for _ in outs[1:]]
    raise _Fail  # packed sequences are followed by the recurrent rule itself


def _no_batch(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
    """Results that never carry the batch (``zeros_like``, shape queries ...)."""
    return [None for _ in _outputs(result)]


def _build() -> dict[Any, Rule]:
    # torch's own functions even while patch_torch has replaced names (the table may be built
    # then): the tracking mode maps a truegrad door back to torch's function before lookup
    T = torch.Tensor
    F = _originals.F
    torch_ = _originals.T
    table: dict[Any, Rule] = {}

    def add(rule: Rule, *functions: Any) -> None:
        for function in functions:
            if function is not None:
                table[function] = rule

    pointwise_names = [
        "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide",
        "floor_divide", "remainder", "fmod", "pow", "float_power", "atan2", "arctan2",
        "maximum", "minimum", "fmax", "fmin", "eq", "ne", "lt", "le", "gt", "ge", "greater",
        "greater_equal", "less", "less_equal", "not_equal", "logical_and", "logical_or",
        "logical_xor", "logical_not", "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not",
        "where", "masked_fill", "clamp", "clip", "clamp_min", "clamp_max", "lerp", "addcmul",
        "addcdiv", "hypot", "copysign", "xlogy", "abs", "absolute", "neg", "negative", "exp",
        "exp2", "expm1", "log", "log1p", "log2", "log10", "sqrt", "rsqrt", "sin", "cos", "tan",
        "asin", "acos", "atan", "sinh", "cosh", "tanh", "asinh", "acosh", "atanh", "arcsin",
        "arccos", "arctan", "arctanh", "sigmoid", "logit", "erf", "erfc", "erfinv", "reciprocal",
        "square", "sign", "sgn", "signbit", "floor", "ceil", "round", "trunc", "frac", "fix",
        "relu", "nan_to_num", "isnan", "isinf", "isfinite", "isposinf", "isneginf", "isclose",
        "dropout", "alpha_dropout", "feature_alpha_dropout", "feature_dropout", "threshold",
        "clone", "detach", "contiguous", "to", "type", "float", "double", "half", "bfloat16",
        "long", "int", "short", "bool", "byte", "char", "cpu", "cuda", "requires_grad_",
        "positive", "conj", "resolve_conj", "resolve_neg", "heaviside", "logaddexp",
        "logaddexp2", "softplus", "silu", "mish", "hardswish", "hardsigmoid", "hardtanh",
        "relu6", "elu", "selu", "celu", "leaky_relu", "gelu", "rrelu", "logsigmoid",
        "softsign", "tanhshrink", "softshrink", "hardshrink", "mvlgamma", "lgamma", "digamma",
        "i0", "sinc", "deg2rad", "rad2deg", "exp_", "fill_", "zero_", "copy_", "masked_fill_",
        "sigmoid_", "tanh_", "relu_", "clamp_", "clamp_min_", "clamp_max_", "neg_", "sqrt_",
        "rsqrt_", "pow_", "abs_", "reciprocal_", "square_", "floor_", "ceil_", "round_",
        "log_", "exp_", "erf_", "lerp_", "addcmul_", "addcdiv_", "add_", "sub_", "mul_",
        "div_", "fmod_", "remainder_", "dropout_", "detach_", "where_", "nan_to_num_",
        "logical_not_", "bitwise_not_", "clip_", "trunc_", "sign_", "uniform_", "normal_",
        "bernoulli", "bernoulli_", "__and__", "__or__", "__xor__", "__invert__", "__iand__",
        "__ior__", "__ixor__", "__lshift__", "__rshift__", "__mod__", "__rmod__", "__floordiv__",
        "__rfloordiv__", "float_power_",
    ]
    dunder = [
        "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__",
        "__rmul__", "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "__pow__",
        "__rpow__", "__ipow__", "__neg__", "__abs__", "__eq__", "__ne__", "__lt__", "__le__",
        "__gt__", "__ge__", "__pos__",
    ]
    for name in pointwise_names + dunder:
        add(_pointwise, getattr(T, name, None), getattr(torch_, name, None))
    for name in ["relu", "relu_", "gelu", "silu", "mish", "softplus", "elu", "elu_", "selu",
                 "celu", "leaky_relu", "leaky_relu_", "hardtanh", "hardtanh_", "relu6",
                 "hardswish", "hardsigmoid", "logsigmoid", "softsign", "tanhshrink",
                 "softshrink", "hardshrink", "threshold", "threshold_", "dropout", "dropout1d",
                 "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "sigmoid",
                 "tanh", "rrelu"]:
        add(_pointwise, getattr(F, name, None))
    add(_pointwise, getattr(torch_, "rsub", None), getattr(torch._C._nn, "gelu", None))
    add(_first_only, T.type_as)
    for name in ["view", "reshape", "view_as", "reshape_as"]:
        add(_reshape, getattr(T, name, None), getattr(torch_, name, None))
    for name in ["transpose", "swapaxes", "swapdims", "t", "permute", "movedim", "moveaxis",
                 "unsqueeze", "squeeze", "expand", "expand_as", "flatten", "unflatten",
                 "broadcast_to", "ravel", "unsqueeze_", "squeeze_", "t_", "transpose_"]:
        add(_dims_map, getattr(T, name, None), getattr(torch_, name, None))
    for name in ["T", "mT"]:
        add(_dims_map, getattr(T, name).__get__)
    for name in ["data"]:
        add(_first_only, getattr(T, name).__get__)
    for name in ["split", "chunk", "unbind", "narrow", "select", "tensor_split",
                 "split_with_sizes", "index_select", "unfold"]:
        add(_narrowing, getattr(T, name, None), getattr(torch_, name, None))
    add(_narrowing, getattr(torch.functional, "split", None))
    for name in ["sum", "mean", "prod", "amax", "amin", "std", "var", "logsumexp", "nansum",
                 "nanmean", "all", "any", "count_nonzero", "argmax", "argmin", "max", "min",
                 "median", "nanmedian", "mode", "std_mean", "var_mean", "aminmax"]:
        add(_dim_op(False), getattr(T, name, None), getattr(torch_, name, None))
    add(_dim_op(False, dim_index=2), T.norm, torch.norm)
    for name in ["softmax", "log_softmax", "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp",
                 "sort", "argsort"]:
        add(_dim_op(True), getattr(T, name, None), getattr(torch_, name, None))
    for name in ["softmax", "log_softmax", "softmin", "glu"]:
        add(_dim_op(True), getattr(F, name, None))
    add(_dim_op(True, dim_index=2), F.normalize)
    add(_dim_op(True, dim_index=2, dim_name="dims"), T.roll, torch.roll)
    add(_dim_op(True, dim_index=1, dim_name="dims"), T.flip, torch.flip)
    add(_dim_op(True, dim_index=2), T.topk, torch.topk)
    add(_tril, T.tril, torch.tril, T.triu, torch.triu, T.tril_, T.triu_)
    add(_gather, T.gather, torch.gather, torch.take_along_dim, T.take_along_dim)
    add(_cat, torch.cat, torch.concat, torch.concatenate, torch.stack)
    add(_getitem, T.__getitem__)
    add(_setitem, T.__setitem__)
    from truegrad.nn.rules import matmul as _matmul

    for function in list(_matmul.MATMUL_OPS) + list(_EXTRA_PRODUCTS):
        if function is not F.linear:
            add(_products, function)
    add(_linear, F.linear)
    add(_layer_norm, F.layer_norm, getattr(F, "rms_norm", None))
    add(_embedding, F.embedding, F.one_hot)
    add(_embedding_bag, F.embedding_bag)
    add(_bilinear, F.bilinear, torch_.bilinear)
    add(_like_first, F.prelu, torch_.prelu, getattr(torch_, "_prelu_kernel", None))
    for name in ["conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                 "conv_transpose3d", "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d",
                 "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                 "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
                 "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "interpolate", "upsample",
                 "pixel_shuffle", "pixel_unshuffle", "group_norm", "instance_norm", "batch_norm",
                 "local_response_norm", "unfold", "fold", "max_pool1d_with_indices",
                 "max_pool2d_with_indices", "max_pool3d_with_indices", "channel_shuffle",
                 "grid_sample"]:
        add(_leading_batch, getattr(F, name, None))
    for name in ["conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                 "conv_transpose3d", "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d",
                 "adaptive_avg_pool1d", "adaptive_max_pool1d", "group_norm", "instance_norm",
                 "batch_norm", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle"]:
        add(_leading_batch, getattr(torch_, name, None))
    add(_pad, F.pad, getattr(torch._C._nn, "pad", None), getattr(torch_, "constant_pad_nd", None))
    add(_attention, F.scaled_dot_product_attention)
    add(_mha, F.multi_head_attention_forward)
    for name in ["lstm", "gru", "rnn_tanh", "rnn_relu"]:
        add(_recurrent, getattr(torch_, name, None))
    for name in ["zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
                 "randint_like", "zeros", "ones", "empty", "full", "rand", "randn", "randint",
                 "eye", "tensor", "as_tensor"]:
        add(_no_batch, getattr(torch_, name, None))  # tensors among their arguments are sizes
    for name in ["new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "size", "dim",
                 "numel", "element_size", "nelement", "stride", "data_ptr", "is_contiguous",
                 "storage_offset", "untyped_storage", "is_floating_point", "is_complex",
                 "get_device", "tolist", "item", "__len__", "__bool__", "__int__", "__float__",
                 "__index__", "__repr__", "__format__", "__hash__", "numpy", "equal",
                 "register_hook", "retain_grad", "backward", "__reduce_ex__", "__deepcopy__",
                 "__iter__", "__contains__", "__array__", "dim_order", "has_names"]:
        add(_no_batch, getattr(T, name, None))
    add(_no_batch, torch_.equal, torch_.is_tensor, torch_.numel, getattr(torch_, "is_floating_point", None),
        getattr(torch_, "is_nonzero", None), getattr(torch_, "result_type", None),
        getattr(torch_, "can_cast", None), getattr(torch_, "promote_types", None))
    return table


def _tril(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
    source = args[0]
    own = next((lay for t, lay in tagged if t is source), None)
    if own is None:
        if tagged:
            raise _Fail
        return [None]
    if own.dim >= source.dim() - 2:
        raise _Fail
    return [own]


def _pad(func: Any, args: tuple, kwargs: dict, result: Any, tagged: list) -> list:
    source = args[0] if args else kwargs.get("input")
    own = next((lay for t, lay in tagged if t is source), None)
    if own is None or any(t is not source for t, _ in tagged):
        if tagged and own is None:
            raise _Fail
        return [None]
    pad = _arg(args, kwargs, 1, "pad")
    touched = len(pad) // 2
    if own.dim >= source.dim() - touched:
        raise _Fail
    return [own]


_EXTRA_PRODUCTS: dict[Any, str] = {torch.baddbmm: "baddbmm", torch.Tensor.baddbmm: "baddbmm"}
_TABLE: dict[Any, Rule] = {}


def _table() -> dict[Any, Rule]:
    if not _TABLE:
        _TABLE.update(_build())
    return _TABLE


def rule_for(func: Any) -> Rule | None:
    try:
        return (_TABLE or _table()).get(func)
    except TypeError:  # unhashable callable
        return None


def inputs_tagged(args: tuple, kwargs: dict) -> tuple[list[tuple[torch.Tensor, Layout]], Lost | None]:
    """The tagged tensors among the arguments, and the first :class:`Lost` tag if any."""
    tagged: list[tuple[torch.Tensor, Layout]] = []
    lost: Lost | None = None
    epoch = current_epoch()
    for value in itertools.chain(args, kwargs.values()):
        for t in _tensors(value):
            entry = getattr(t, _ATTRIBUTE, None)
            if entry is None or entry[0] != epoch:
                continue
            if isinstance(entry[1], Lost):
                lost = lost or entry[1]
            elif isinstance(entry[1], Layout):
                tagged.append((t, entry[1]))
    return tagged, lost


_PERM_KEEPS = {"view", "reshape", "unsqueeze", "expand", "expand_as", "to", "contiguous", "clone",
               "long", "int", "cpu", "cuda", "detach", "__getitem__", "view_as", "reshape_as"}


def _sorted_perm(func: Any, args: tuple, kwargs: dict, outs: list, tagged: list) -> list | None:
    """``torch.sort`` / ``argsort`` of N values: the indices are a permutation of the samples
    (a fresh :class:`Perm`); sorted values that carried the samples keep them, reordered."""
    n = _current_batch()
    source = _arg(args, kwargs, 0, "input")
    if n is None or not isinstance(source, torch.Tensor) or source.dim() != 1 or source.shape[0] != n:
        return None
    if func not in (torch.sort, torch.Tensor.sort, torch.argsort, torch.Tensor.argsort):
        return None
    own = next((lay for t, lay in tagged if t is source), None)
    if tagged and own is None:
        return None
    token = _fresh()
    if func in (torch.argsort, torch.Tensor.argsort):
        return [Perm(0, n, token)]
    values = own.permuted(token) if own is not None and own.plain else None
    return [values, Perm(0, n, token)]


def _perm(func: Any, args: tuple, kwargs: dict, outs: list) -> Perm | None:
    """The :class:`Perm` tag of an op's only output computed from no tensor that carries the
    samples, if it has one: ``arange(N)``, ``randperm(N)``, the inverse of a permutation
    (``empty_like(p).scatter_(0, p, arange(N))``), views and casts of one."""
    n = _current_batch()
    if n is None or len(outs) != 1:
        return None
    out = outs[0]
    name = getattr(func, "__name__", "")
    if func is torch.arange:
        if out.dim() == 1 and out.shape[0] == n and not out.is_floating_point():
            numbers = [a for a in args if not isinstance(a, torch.Tensor)]
            start = numbers[0] if len(numbers) >= 2 else kwargs.get("start", 0)
            step = numbers[2] if len(numbers) >= 3 else kwargs.get("step", 1)
            if start == 0 and step == 1:
                return Perm(0, n)
        return None
    if func is torch.randperm:
        return Perm(0, n, _fresh()) if out.dim() == 1 and out.shape[0] == n else None
    if func is torch.Tensor.scatter_ and len(args) >= 4 and _arg(args, kwargs, 1, "dim") == 0:
        index, src = _perm_of(args[2]), _perm_of(args[3])
        if index is not None and src is not None and src.token == () and out.dim() == 1 and out.shape[0] == index.n:
            return Perm(0, index.n, _inverse(index.token))
        return None
    if name not in _PERM_KEEPS or not args or not isinstance(args[0], torch.Tensor):
        return None
    perm = _perm_of(args[0])
    if perm is None or out.is_floating_point():
        return None
    source = args[0]
    try:
        if name == "__getitem__":
            moved = _where_index(source, args[1], Layout(perm.dim, perm.n))
            return Perm(moved.dim, perm.n, perm.token)
    except _Fail:
        return None
    if name in ("expand", "expand_as"):
        pos = perm.dim + out.dim() - source.dim()
        return Perm(pos, perm.n, perm.token) if 0 <= pos < out.dim() and out.shape[pos] == perm.n else None
    if name in ("to", "contiguous", "clone", "long", "int", "cpu", "cuda", "detach"):
        return perm
    # view / reshape / unsqueeze of an unexpanded one: only size-1 dims come and go
    real = [i for i, size in enumerate(out.shape) if size != 1]
    if len(real) == 1 and out.shape[real[0]] == perm.n and source.numel() == perm.n:
        return Perm(real[0], perm.n, perm.token)
    return None


def _packed_tag(t: Any) -> Packed | None:
    entry = getattr(t, _ATTRIBUTE, None) if isinstance(t, torch.Tensor) else None
    if entry is None or entry[0] != current_epoch() or not isinstance(entry[1], Packed):
        return None
    return entry[1]


def _packing(func: Any, args: tuple, kwargs: dict, outs: list, tagged: list) -> list | None:
    """Packed sequences: ``_pack_padded_sequence`` of the model's samples gives
    :class:`Packed` data, a recurrent op on it gives packed data and states over the samples,
    and ``_pad_packed_sequence`` gives them back padded (``None``: not one of these ops)."""
    if func is getattr(torch, "_pack_padded_sequence", None):
        source, batch_first = args[0], bool(_arg(args, kwargs, 2, "batch_first", False))
        own = next((lay for t, lay in tagged if t is source), None)
        if own is None:  # (the lengths may carry the samples: they only make batch_sizes)
            return [None for _ in outs] if not tagged else [Lost(_name(func))] * len(outs)
        if not own.plain or own.dim != (0 if batch_first else 1):
            return [Lost(_name(func))] * len(outs)
        return [Packed(own.n, own.order), None]
    if func is getattr(torch, "_pad_packed_sequence", None):
        packed = _packed_tag(args[0])
        if packed is None:
            return None
        batch_first = bool(_arg(args, kwargs, 2, "batch_first", False))
        padded = Layout(0 if batch_first else 1, packed.n, order=packed.order)
        return [padded, None]
    if func in _RECURRENT and len(args) > 1 and isinstance(args[1], torch.Tensor) and (
        args[1].dtype == torch.int64 and args[1].dim() == 1
    ):
        packed = _packed_tag(args[0])
        if packed is None:
            return None
        state = Layout(1, packed.n, order=packed.order)
        hx = args[2]
        for h in (hx if isinstance(hx, (list, tuple)) else (hx,)):
            lay = next((lay for t, lay in tagged if t is h), None)
            if lay is not None and lay != state:
                return [Lost(_name(func))] * len(outs)
        return [Packed(packed.n, packed.order)] + [state] * (len(outs) - 1)
    return None


_RECURRENT = {getattr(torch, name) for name in ("lstm", "gru", "rnn_tanh", "rnn_relu")}


def _current_batch() -> int | None:
    from truegrad.engine import forward  # forward imports this module

    return forward.batch_size()


def propagate(func: Any, args: tuple, kwargs: dict, result: Any) -> None:
    """Tag the outputs of ``func(*args, **kwargs) -> result`` from the tags of its inputs."""
    outs = _outputs(result)
    if not outs and func is not torch.Tensor.__setitem__:
        return
    tagged, lost = inputs_tagged(args, kwargs)
    special = _packing(func, args, kwargs, outs, tagged) if lost is None else None
    if special is None and lost is None:
        if any(_packed_tag(t) is not None for v in (*args, *kwargs.values()) for t in _tensors(v)):
            lost = Lost(f"{_name(func)} on a PackedSequence's data")  # only the rules above read it
        else:
            special = _sorted_perm(func, args, kwargs, outs, tagged)
    if special is not None:
        for out, value in zip(outs, special):
            tag(out, value)
        return
    if not tagged and lost is None:
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and outs and args and outs[0] is args[0]:
            # an in-place op that writes constants into a tensor: whatever it carried is gone
            if isinstance(layout_of(outs[0]), (Layout, Lost, Packed)):
                tag(outs[0], None)
        perm = _perm(func, args, kwargs, outs)
        if perm is not None:
            tag(outs[0], perm)
        return
    if lost is not None:
        for out in outs:
            tag(out, lost)
        return
    if tagged and all(lay.n == 1 for _, lay in tagged):  # one sample: everything from it is it
        for out in outs:
            tag(out, Layout(0, 1))
        if func is torch.Tensor.__setitem__:
            tag(args[0], Layout(0, 1))
        return
    rule = rule_for(func)
    if rule is None:
        value: Tag | None = Lost(_name(func))
        for out in outs:
            tag(out, value)
        return
    try:
        tags = rule(func, args, kwargs, result, tagged)
    except (_Fail, ValueError, IndexError, TypeError, KeyError, StopIteration):
        for out in outs:
            tag(out, Lost(_name(func)))
        return
    for out, value in zip(outs, tags):
        tag(out, value)


def lose(func: Any, result: Any) -> None:
    """Mark the outputs of ``func`` as :class:`Lost` (its rule could not run on them)."""
    for out in _outputs(result):
        try:
            tag(out, Lost(_name(func)))
        except Exception:  # noqa: BLE001 - a tensor that takes no attribute: leave it
            pass


def output_layout(func: Any, args: tuple, kwargs: dict, result: torch.Tensor) -> Tag | None:
    """The tag :func:`propagate` gives the tensor ``result`` (also sets it)."""
    propagate(func, args, kwargs, result)
    return layout_of(result)
