"""truegrad._weakid.WeakIdMap: identity keys, never keeps a tensor alive."""

from __future__ import annotations

import gc

import torch

from truegrad._weakid import WeakIdMap


def test_lookup_is_by_identity_not_value() -> None:
    a, b = torch.zeros(3), torch.zeros(3)
    m: WeakIdMap[str] = WeakIdMap()
    m[a] = "a"
    assert m.get(a) == "a" and m.get(b) is None and a in m and b not in m
    m[a] = "again"
    assert m.get(a) == "again" and len(m) == 1
    assert m.pop(a) == "again" and m.get(a) is None and m.pop(a, "gone") == "gone"


def test_entry_disappears_with_its_tensor() -> None:
    m: WeakIdMap[int] = WeakIdMap()
    p = torch.nn.Parameter(torch.randn(2))
    m[p] = 1
    del p
    gc.collect()
    assert len(m) == 0


def test_replaced_entry_is_not_dropped_by_the_old_reference() -> None:
    m: WeakIdMap[int] = WeakIdMap()
    t = torch.randn(2)
    m[t] = 1
    m[t] = 2  # the first weak reference is discarded; its callback must not remove entry 2
    gc.collect()
    assert m.get(t) == 2
