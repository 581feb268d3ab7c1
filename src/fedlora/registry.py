"""Where methods are found, without importing them: the built-in methods' modules, and methods other packages
register under the ``fedlora.methods`` entry-point group.

A package that brings a method declares, in its ``pyproject.toml``::

    [project.entry-points."fedlora.methods"]
    myavg = "my_package.myavg:MyAvg"     # a fedlora.methods.base.Method subclass with name = "myavg"

and, once installed, ``--set method=myavg`` runs it (docs/architecture.md, "Adding a method").  Configuration checks
method names here, so that loading a config imports no method (and no torch).
"""
from __future__ import annotations

from importlib import import_module, metadata

ENTRY_POINT_GROUP = "fedlora.methods"

BUILTIN_METHODS: dict[str, str] = {
    "fedit": "fedlora.methods.fedit", "ffa": "fedlora.methods.ffa", "flexlora": "fedlora.methods.flexlora",
    "hetlora": "fedlora.methods.hetlora", "flora": "fedlora.methods.flora", "pilot": "fedlora.methods.pilot",
    "fedra": "fedlora.methods.fedra", "randk": "fedlora.methods.fedra", "topk": "fedlora.methods.fedra",
    "fedex": "fedlora.methods.fedex", "rolora": "fedlora.methods.rolora", "fedsvd": "fedlora.methods.fedsvd",
    "fedsa": "fedlora.methods.fedsa", "lorafair": "fedlora.methods.lorafair", "fedsb": "fedlora.methods.fedsb",
}


def plugin_entry_points() -> dict[str, metadata.EntryPoint]:
    """Methods other installed packages register (a built-in name cannot be taken over)."""
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name not in BUILTIN_METHODS}


def method_names() -> list[str]:
    """Every method a config may name: the built-in ones and the registered plugins."""
    return sorted(set(BUILTIN_METHODS) | set(plugin_entry_points()))


def load(name: str) -> object | None:
    """Import the module that defines method ``name`` (its ``@register`` runs); for a plugin, what its entry point
    names (a Method subclass, or a module that registers one).  None when no such method is known."""
    if name in BUILTIN_METHODS:
        return import_module(BUILTIN_METHODS[name])
    ep = plugin_entry_points().get(name)
    return ep.load() if ep is not None else None
