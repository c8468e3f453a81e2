"""Loading policies by name: the one place a name becomes a policy.

The compute server builds one :class:`PolicyRegistry` at start-up from :data:`BUILTIN_POLICIES`
plus any ``--policy-plugin module:Class`` (config ``policy_plugins``); its validation,
``GetModelInfo().policies`` and, through that, the CLI and the benchmarks read the names from it.
Adding a policy = one module + one line in :data:`BUILTIN_POLICIES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence

from contiguouskv.compute_server.policies.base import LoadingPolicy, PolicyContext
from contiguouskv.compute_server.policies.contiguous import ContiguousPolicy
from contiguouskv.compute_server.policies.contiguous_plus import DigestShortlistPolicy
from contiguouskv.compute_server.policies.full import FullPolicy
from contiguouskv.compute_server.policies.h2o import H2OPolicy
from contiguouskv.compute_server.policies.identified import (
    ContiguousPlusPolicy, OneBitPolicy, OraclePolicy, QuestPolicy,
)
from contiguouskv.compute_server.policies.impress import ImpressPolicy
from contiguouskv.compute_server.policies.recompute import RecomputePolicy

BUILTIN_POLICIES: tuple[type[LoadingPolicy], ...] = (
    RecomputePolicy, FullPolicy, ContiguousPolicy, ContiguousPlusPolicy, H2OPolicy, ImpressPolicy,
    OneBitPolicy, QuestPolicy, DigestShortlistPolicy, OraclePolicy,
)
DEFAULT_POLICY = FullPolicy.name
"""What a request that names no policy gets: everything loaded, the reference answer."""


def load_plugin(spec: str) -> type[LoadingPolicy]:
    """The class named by ``module.path:ClassName``; ValueError saying what is wrong otherwise."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"policy plugin {spec!r}: expected module.path:ClassName")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"policy plugin {spec!r}: cannot import {module_name}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, LoadingPolicy)):
        raise ValueError(f"policy plugin {spec!r}: {class_name} is not a LoadingPolicy subclass")
    return cls


class PolicyRegistry:
    """Policy classes by their ``name``; immutable once built."""

    def __init__(self, classes: Iterable[type[LoadingPolicy]]) -> None:
        by_name: dict[str, type[LoadingPolicy]] = {}
        for cls in classes:
            if not cls.name:
                raise ValueError(f"policy {cls.__qualname__} has no name")
            if cls.name in by_name:
                raise ValueError(f"policy name {cls.name!r} is taken by {by_name[cls.name].__qualname__}")
            by_name[cls.name] = cls
        self._by_name = by_name

    @classmethod
    def with_plugins(cls, plugins: Sequence[str] = ()) -> "PolicyRegistry":
        """The built-in policies plus ``module:Class`` plugins."""
        return cls([*BUILTIN_POLICIES, *(load_plugin(spec) for spec in plugins)])

    @property
    def default(self) -> str:
        return DEFAULT_POLICY

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def classes(self) -> tuple[type[LoadingPolicy], ...]:
        return tuple(self._by_name.values())

    def get(self, name: str) -> type[LoadingPolicy]:
        """The class of ``name``; KeyError when unknown."""
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def layouts(self) -> tuple[str, ...]:
        """Every stored layout kind some policy reads."""
        return tuple(dict.fromkeys(cls.layout for cls in self._by_name.values()))

    def create(self, name: str, context: PolicyContext) -> LoadingPolicy:
        return self._by_name[name](context)
