"""Which ``torch.nn`` module types truegrad covers, and with which ``truegrad.nn`` class.

Lookup follows the MRO, so a subclass of a supported module (``class MyLinear(nn.Linear)``)
is supported by its base's rule. Registration is explicit: :data:`REGISTRY` is built
from the rule lists of the family files in ``truegrad.nn.rules.__init__``, never by
import side effects, and :meth:`Registry.register` refuses to replace a rule unless
``overwrite=True``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

import torch

__all__ = ["Registry", "Rule"]


@dataclasses.dataclass(frozen=True)
class Rule:
    """How truegrad covers one ``torch.nn`` module type.

    Attributes:
        torch_type: the ``torch.nn`` class, e.g. ``torch.nn.Linear``.
        module_type: the ``truegrad.nn`` class that replaces it; a subclass of
            ``torch_type`` with the same constructor and ``state_dict`` keys, whose
            forward calls the family's autograd Functions.
        parameters: names of the parameters that get a statistic.
        unsupported: optional check returning why a particular instance cannot be
            covered (e.g. ``Embedding(sparse=True)``), or ``None`` when it can.
    """

    torch_type: type[torch.nn.Module]
    module_type: type[torch.nn.Module]
    parameters: tuple[str, ...]
    unsupported: Callable[[torch.nn.Module], str | None] | None = None

    def __post_init__(self) -> None:
        if not issubclass(self.module_type, self.torch_type):
            raise TypeError(
                f"{self.module_type.__qualname__} must subclass {self.torch_type.__qualname__}"
            )


class Registry:
    """A mapping from ``torch.nn`` module types to :class:`Rule`, looked up along the MRO."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self._rules: dict[type[torch.nn.Module], Rule] = {}
        for rule in rules:
            self.register(rule)

    def register(self, rule: Rule, *, overwrite: bool = False) -> None:
        """Add ``rule``; raise ``ValueError`` if its type has a rule and not ``overwrite``."""
        if rule.torch_type in self._rules and not overwrite:
            raise ValueError(
                f"a rule for {rule.torch_type.__module__}.{rule.torch_type.__qualname__} is "
                "already registered; pass overwrite=True to replace it"
            )
        self._rules[rule.torch_type] = rule

    def lookup(self, module_type: type[torch.nn.Module]) -> Rule | None:
        """The rule for ``module_type`` or its nearest registered base class, else ``None``.

        A ``truegrad.nn`` class maps to the rule of the ``torch.nn`` class it replaces.
        """
        for klass in module_type.__mro__:
            rule = self._rules.get(klass)
            if rule is not None:
                return rule
        return None

    def __contains__(self, module_type: object) -> bool:
        return isinstance(module_type, type) and self.lookup(module_type) is not None

    def __iter__(self) -> Iterator[Rule]:
        return iter(list(self._rules.values()))

    def __len__(self) -> int:
        return len(self._rules)
