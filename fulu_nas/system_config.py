"""The spec's YAML configuration (a ``fulu:`` block of four sections) as the keyword arguments of
:func:`~fulu_nas.system.create_ultimate_pimoe_system`, each of its keys mapped to the argument that
switches the mechanism it names (docs/system.md, "From the spec's YAML configuration").

Every key is checked before anything is built: an unknown section or key, a flag that is not true or
false, two keys that set one argument differently, and a key whose ``false`` nothing could honour are
each a ValueError naming the key (``fulu.advanced_routing.hierarchical_router``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from .checks import strict_yaml, yaml_problem
from .moe import MoEConfig
from .system import RoutingStrategy, UltimatePiMoESystem, create_ultimate_pimoe_system, enum_member

# fulu.advanced_routing: the flags that switch a feature, and the argument each sets.
ROUTING_FEATURES = {
    "dynamic_expert_scaling": "enable_dynamic_scaling",
    "cross_expert_communication": "enable_cross_expert_communication",
    "neural_architecture_search": "enable_neural_architecture_search",
    "adaptive_learning": "enable_adaptive_learning",
}
# ... and the flags that enable a router: the routing_strategy must be one of those enabled.
ROUTER_FLAGS = {
    "attention_based_router": RoutingStrategy.ATTENTION_BASED,
    "hierarchical_router": RoutingStrategy.HIERARCHICAL,
    "top_k_router": RoutingStrategy.TOP_K,
    "expert_choice_router": RoutingStrategy.EXPERT_CHOICE,
    "hash_router": RoutingStrategy.HASH,
}
# fulu.performance_optimization: four names for what one switch does in fulu-nas (the level's dispatch:
# the experts in grouped GEMMs over tokens sorted once; off, a loop over the experts), and the hardware
# switch.
DISPATCH_FLAGS = ("memory_optimization", "computational_optimization", "parallel_processing", "intelligent_caching")
HARDWARE_FLAG = "hardware_optimization"
# fulu.ultimate_system: properties of every system fulu-nas builds, with no switch to turn them off.
ALWAYS_ON = {
    "comprehensive_integration": "every mechanism is in the one module the function returns",
    "advanced_configuration": "every argument of create_ultimate_pimoe_system is configurable",
    "production_ready": "optimize_for_inference() prepares any system for serving",
    "monitoring": "every forward reports its figures with return_comprehensive_info=True",
}
SECTIONS = ("ultimate_pimoe", "advanced_routing", "performance_optimization", "ultimate_system")


def create_ultimate_pimoe_system_from_config(config: str | Path | Mapping, **overrides: Any) -> UltimatePiMoESystem:
    """The system a spec-style YAML configuration describes: ``config`` is the path of a YAML file, or
    its parsed mapping, with a top-level ``fulu:`` block (other top-level keys are left to their owners).
    ``overrides`` are keyword arguments of :func:`create_ultimate_pimoe_system` that take precedence over
    the file's (``device="cuda"``)."""
    return create_ultimate_pimoe_system(**{**system_arguments(config), **overrides})


def system_arguments(config: str | Path | Mapping) -> dict[str, Any]:
    """The keyword arguments of :func:`create_ultimate_pimoe_system` that ``config``'s ``fulu:`` block
    sets (see :func:`create_ultimate_pimoe_system_from_config`); ValueError naming a key it cannot take."""
    shown = "the configuration"
    if isinstance(config, str | Path):
        shown = str(config)
        config = _read_yaml(Path(config))
    if not isinstance(config, Mapping) or "fulu" not in config:
        raise ValueError(f"{shown}: no top-level 'fulu:' block (the spec's configuration starts with it)")
    block = _mapping(config["fulu"], "fulu")
    if unknown := _unknown(block, SECTIONS):
        raise ValueError(f"fulu.{unknown[0]}: not a section of the configuration (choose from {', '.join(SECTIONS)})")
    arguments = _system_section(_mapping(block.get("ultimate_pimoe", {}), "fulu.ultimate_pimoe"))
    set_by = {name: f"fulu.ultimate_pimoe.{name}" for name in arguments}
    _routing_section(_mapping(block.get("advanced_routing", {}), "fulu.advanced_routing"), arguments, set_by)
    _performance_section(_mapping(block.get("performance_optimization", {}), "fulu.performance_optimization"),
                         arguments, set_by)
    _always_on_section(_mapping(block.get("ultimate_system", {}), "fulu.ultimate_system"))
    return arguments


def _read_yaml(path: Path) -> object:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read it ({e})") from None
    try:
        return strict_yaml(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: malformed YAML: {yaml_problem(e)}") from None


def _mapping(value: object, key: str) -> Mapping:
    if value is None:  # a section written with no keys
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{key}: must map keys to values, got {type(value).__name__}")
    return value


def _unknown(section: Mapping, known) -> list:
    """The keys of ``section`` that are not ``known``, in the file's order (a key may be a number)."""
    return [name for name in section if name not in known]


def _shown(value: Any) -> str:
    """A value as the YAML file writes it (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _flag(section: Mapping, name: str, key: str) -> bool:
    value = section[name]
    if not isinstance(value, bool):
        raise ValueError(f"{key}.{name}: must be true or false, got {value!r}")
    return value


def _system_section(section: Mapping) -> dict[str, Any]:
    """fulu.ultimate_pimoe: the function's own arguments by name, and any MoEConfig field it passes on."""
    parameters = set(inspect.signature(create_ultimate_pimoe_system).parameters) - {"moe_overrides"}
    known = parameters | {f.name for f in fields(MoEConfig)}
    if unknown := _unknown(section, known):
        raise ValueError(f"fulu.ultimate_pimoe.{unknown[0]}: neither an argument of create_ultimate_pimoe_system "
                         "nor a MoEConfig field")
    return dict(section)


def _set(arguments: dict, set_by: dict, name: str, value: Any, key: str) -> None:
    """Set the argument ``name`` from ``key``, unless another key set it to something else."""
    if name in arguments and (type(arguments[name]) is not type(value) or arguments[name] != value):
        raise ValueError(f"{key}: {_shown(value)}, but {set_by[name]} sets {name} to {_shown(arguments[name])}; "
                         "give one of them, or the same value")
    arguments[name] = value
    set_by.setdefault(name, key)


def _routing_section(section: Mapping, arguments: dict, set_by: dict) -> None:
    key = "fulu.advanced_routing"
    if unknown := _unknown(section, {*ROUTING_FEATURES, *ROUTER_FLAGS}):
        raise ValueError(f"{key}.{unknown[0]}: not a key of the section (choose from "
                         f"{', '.join([*ROUTER_FLAGS, *ROUTING_FEATURES])})")
    for name, argument in ROUTING_FEATURES.items():
        if name in section:
            _set(arguments, set_by, argument, _flag(section, name, key), f"{key}.{name}")
    flags = [name for name in ROUTER_FLAGS if name in section]
    enabled = [ROUTER_FLAGS[name] for name in flags if _flag(section, name, key)]
    if "routing_strategy" in arguments:
        given = arguments["routing_strategy"]
        strategy = enum_member(RoutingStrategy, given, "fulu.ultimate_pimoe.routing_strategy")
        if flags and strategy not in enabled:
            flag = next(name for name, s in ROUTER_FLAGS.items() if s is strategy)
            shown = given if isinstance(given, str) else strategy.name.lower()
            raise ValueError(f"fulu.ultimate_pimoe.routing_strategy: {shown}, but {key} does not enable its router "
                             f"({flag}" + (": false" if flag in section else " is not given")
                             + f"; enabled: {', '.join(s.name.lower() for s in enabled) or 'none'}); enable it, or "
                             "choose one of those enabled")
    elif len(enabled) == 1:  # the one router enabled is the strategy
        arguments["routing_strategy"] = enabled[0]
    elif enabled:
        raise ValueError(f"{key}: enables {len(enabled)} routers ({', '.join(s.name.lower() for s in enabled)}); a "
                         "system routes with one: say which with fulu.ultimate_pimoe.routing_strategy")
    elif flags:
        raise ValueError(f"{key}: enables no router ({', '.join(f'{name}: false' for name in flags)}): enable the "
                         "one to route with, or give fulu.ultimate_pimoe.routing_strategy")


def _performance_section(section: Mapping, arguments: dict, set_by: dict) -> None:
    key = "fulu.performance_optimization"
    if unknown := _unknown(section, {*DISPATCH_FLAGS, HARDWARE_FLAG}):
        raise ValueError(f"{key}.{unknown[0]}: not a key of the section (choose from "
                         f"{', '.join([*DISPATCH_FLAGS, HARDWARE_FLAG])})")
    if HARDWARE_FLAG in section:
        _set(arguments, set_by, "enable_hardware_optimization", _flag(section, HARDWARE_FLAG, key),
             f"{key}.{HARDWARE_FLAG}")
    given = {name: _flag(section, name, key) for name in DISPATCH_FLAGS if name in section}
    if len(set(given.values())) > 1:
        on = [n for n, v in given.items() if v]
        off = [n for n, v in given.items() if not v]
        raise ValueError(f"{key}: {', '.join(on)} true but {', '.join(off)} false: one switch does all four "
                         "(enable_performance_optimization: the level's dispatch, the experts in grouped GEMMs; off, "
                         "a loop over the experts); set them alike")
    if given:
        name = next(iter(given))
        _set(arguments, set_by, "enable_performance_optimization", given[name], f"{key}.{name}")


def _always_on_section(section: Mapping) -> None:
    key = "fulu.ultimate_system"
    if unknown := _unknown(section, ALWAYS_ON):
        raise ValueError(f"{key}.{unknown[0]}: not a key of the section (choose from {', '.join(ALWAYS_ON)})")
    for name, why in ALWAYS_ON.items():
        if name in section and not _flag(section, name, key):
            raise ValueError(f"{key}.{name}: false, but it cannot be switched off ({why}); leave it out or "
                             "set it true")
