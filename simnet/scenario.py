"""Scenario files: TOML with typed parameters (unit, default, description), roles with counts and link
profiles, and phases. Loading resolves `--set key=value` overrides and `{param}` references.

    name = "fleet-fanout"
    program = "fleet"                      # which simnet program runs it (see simnet.cli.PROGRAMS)
    description = "..."

    [params.runners]
    type = "int"                           # int | float | bool | str | bytes | duration
    default = 1000
    unit = "nodes"
    description = "runners fetching at once"

    [roles.runner]
    count = "{runners}"                    # a number or a reference to a parameter
    link = "{runner_link}"                 # a named profile from simnet.links.PROFILES

    [[phases]]
    action = "fetch"
    at = "0s"

It owns parsing and validation only (errors are one line naming the file and the key); running a
scenario is the program's job.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Param", "Role", "Scenario", "ScenarioError", "load_scenario", "parse_value"]

TYPES = ("int", "float", "bool", "str", "bytes", "duration")
_SIZE = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
         "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12, "tib": 1 << 40}
_TIME = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "m": 60.0, "min": 60.0, "h": 3600.0}
_REF = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")


class ScenarioError(ValueError):
    """A scenario file or an override is not valid."""


def parse_value(kind: str, raw: Any, where: str) -> Any:
    try:
        if kind == "int":
            if isinstance(raw, bool):
                raise ValueError
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "str":
            return str(raw)
        if kind in ("bytes", "duration"):
            if isinstance(raw, (int, float)) and not isinstance(raw, bool):
                return int(raw) if kind == "bytes" else float(raw)
            m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(raw))
            if not m:
                raise ValueError
            table = _SIZE if kind == "bytes" else _TIME
            unit = m.group(2).lower()
            if unit not in table:
                raise ValueError
            value = float(m.group(1)) * table[unit]
            return int(value) if kind == "bytes" else value
    except (TypeError, ValueError):
        pass
    raise ScenarioError(f"{where}: {raw!r} is not a valid {kind}")


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: Any
    unit: str
    description: str
    choices: tuple = ()


@dataclass
class Role:
    name: str
    count: int
    link: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scenario:
    path: Path
    name: str
    program: str
    description: str
    specs: dict[str, Param]
    params: dict[str, Any]
    roles: list[Role]
    phases: list[dict[str, Any]]

    def role(self, name: str) -> Role:
        for r in self.roles:
            if r.name == name:
                return r
        raise ScenarioError(f"{self.path}: scenario has no role {name!r}")

    def params_with_prefix(self, prefix: str) -> dict[str, Any]:
        return {k[len(prefix):]: v for k, v in self.params.items() if k.startswith(prefix)}

    def describe(self) -> str:
        lines = [f"{self.name} ({self.program}): {self.description}", "parameters:"]
        for p in self.specs.values():
            lines.append(f"  {p.name} = {self.params[p.name]!r} [{p.type}, {p.unit}] {p.description}")
        return "\n".join(lines)


def _resolve(value: Any, params: dict[str, Any], where: str) -> Any:
    if isinstance(value, str):
        whole = _REF.fullmatch(value)
        if whole:
            if whole.group(1) not in params:
                raise ScenarioError(f"{where}: unknown parameter {whole.group(1)!r}")
            return params[whole.group(1)]

        def sub(m: re.Match) -> str:
            if m.group(1) not in params:
                raise ScenarioError(f"{where}: unknown parameter {m.group(1)!r}")
            return str(params[m.group(1)])
        return _REF.sub(sub, value)
    if isinstance(value, dict):
        return {k: _resolve(v, params, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, params, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def load_scenario(path: str | Path, overrides: dict[str, str] | None = None) -> Scenario:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"no scenario file {path}; see simnet/scenarios/ for the shipped ones") from None
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{path}: not valid TOML: {e}") from None
    for key in ("name", "program"):
        if not isinstance(doc.get(key), str):
            raise ScenarioError(f"{path}: missing string key {key!r}")
    specs: dict[str, Param] = {}
    params: dict[str, Any] = {}
    for name, spec in doc.get("params", {}).items():
        where = f"{path}: params.{name}"
        if not isinstance(spec, dict):
            raise ScenarioError(f"{where}: must be a table with type, default, unit, description")
        missing = [k for k in ("type", "default", "unit", "description") if k not in spec]
        if missing:
            raise ScenarioError(f"{where}: missing {', '.join(missing)}")
        if spec["type"] not in TYPES:
            raise ScenarioError(f"{where}: type must be one of {', '.join(TYPES)}")
        p = Param(name, spec["type"], parse_value(spec["type"], spec["default"], where), spec["unit"],
                  spec["description"], tuple(spec.get("choices", ())))
        specs[name] = p
        params[name] = p.default
    for key, raw in (overrides or {}).items():
        if key not in specs:
            raise ScenarioError(f"--set {key}: {path.name} has no parameter {key!r}; known: {', '.join(specs)}")
        params[key] = parse_value(specs[key].type, raw, f"--set {key}")
    for p in specs.values():
        if p.choices and params[p.name] not in p.choices:
            raise ScenarioError(f"{path}: {p.name} must be one of {', '.join(map(str, p.choices))}, "
                                f"not {params[p.name]!r}")
    roles = []
    for name, spec in doc.get("roles", {}).items():
        spec = _resolve(spec, params, f"{path}: roles.{name}")
        try:
            count = int(spec.get("count", 0))
        except (TypeError, ValueError):
            raise ScenarioError(f"{path}: roles.{name}.count must be a number") from None
        if count < 0 or not isinstance(spec.get("link"), str):
            raise ScenarioError(f"{path}: roles.{name} needs count >= 0 and a link profile name")
        extra = {k: v for k, v in spec.items() if k not in ("count", "link")}
        roles.append(Role(name, count, spec["link"], extra))
    phases = []
    for i, ph in enumerate(doc.get("phases", [])):
        ph = _resolve(ph, params, f"{path}: phases[{i}]")
        if "action" not in ph:
            raise ScenarioError(f"{path}: phases[{i}] needs an action")
        ph["at"] = parse_value("duration", ph.get("at", 0), f"{path}: phases[{i}].at")
        if "duration" in ph:
            ph["duration"] = parse_value("duration", ph["duration"], f"{path}: phases[{i}].duration")
        phases.append(ph)
    return Scenario(path, doc["name"], doc["program"], doc.get("description", ""), specs, params, roles, phases)
