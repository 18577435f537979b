"""A sweep file, checked and expanded into its cells: one full config per point of the grid.

    {"base": "exp_config.json",                 # a config file (or the config itself, an object)
     "set": {"max_new_tokens": 64},             # optional: changes to the base for every cell
     "axes": {"pipeline_size": [1, 2], "batch_size": [1, 4], "quantization": ["none", "int8"]},
     "out": "sweeps/t4-llama",                  # the sweep folder (default: sweeps/<sweep file name>)
     "device_memory": "15GiB",                  # optional: each rank's budget for the fit check (a T4's)
     "reference": {"quantization": "none"}}     # optional: the cell the others' perplexity is set against

Axes take any config key but those the sweep owns (output_path, offload_folder, resume, replica,
replicas); the grid is their product, in the order written, the last axis varying fastest. Every
cell's config is built and checked here, so an unknown key, an empty axis or a value the config
would refuse is one line (SweepError) before anything runs or is submitted.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass

from pipeinfer.config import ConfigError, ExpConfig, build_config, check_value, parse_bytes

KEYS = ("base", "set", "axes", "out", "device_memory", "reference")
OWNED = ("output_path", "offload_folder", "resume", "replica", "replicas")  # per cell, set by the sweep
SHORT = {"pipeline_size": "pp", "batch_size": "bs", "micro_batch_size": "mbs", "quantization": "q",
         "max_cpu_memory": "cpu", "max_memory": "mem", "model_path": "model", "layer_split": "split"}
PATH_KEYS = ("model_path", "prompts_file", "chat_template")


class SweepError(ValueError):
    """A bad sweep file: one line naming the key or cell and the fix."""


@dataclass(frozen=True)
class Cell:
    name: str           # "03-pp2-bs4-q_none": its folder under <out>/cells
    values: dict        # the axes' values at this point
    config: dict        # the cell's full config, as written to <out>/cells/<name>/config.json
    cfg: ExpConfig

    @property
    def nodes(self) -> int:
        return self.cfg.pipeline_size


@dataclass(frozen=True)
class Sweep:
    path: str
    out: str
    axes: dict
    cells: list[Cell]
    device_memory: str | int | None
    reference_given: dict | None  # the sweep file's "reference": axis values

    def reference(self, usable: set[str]) -> str | None:
        """The cell the others' quality is set against: the one matching "reference", else the first
        usable (planned to fit) unquantized cell with every layer resident (no max_cpu_memory) in
        float16 or the model's dtype (auto), else the first usable cell."""
        cells = [c for c in self.cells if c.name in usable]
        if self.reference_given is not None:
            match = [c for c in self.cells if all(c.values.get(k, c.config.get(k)) == v
                                                   for k, v in self.reference_given.items())]
            return match[0].name
        plain = [c for c in cells if c.cfg.quantization == "none" and c.cfg.max_cpu_memory is None]
        pick = next((c for c in plain if c.cfg.dtype in ("float16", "auto")), plain[0] if plain else None)
        return pick.name if pick else (cells[0].name if cells else None)

    def cell_dir(self, cell: Cell) -> str:
        return os.path.join(self.out, "cells", cell.name)


def _slug(key: str, value) -> str:
    text = os.path.basename(str(value).rstrip("/")) if key in PATH_KEYS else json.dumps(value).strip('"')
    return re.sub(r"[^A-Za-z0-9.]+", "_", f"{SHORT.get(key, key + '_')}{text}").strip("_")[:40]


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise SweepError(f"{what} {path!r} not found: check the path (relative to the working directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SweepError(f"{what} {path!r} is not valid JSON ({e}): fix the syntax") from None
    except OSError as e:
        raise SweepError(f"{what} {path!r} cannot be read ({e.strerror})") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{what} {path!r} must hold a JSON object")
    return raw


def _check_keys(where: str, keys) -> None:
    for key in keys:
        if key in OWNED:
            raise SweepError(f"{where}: {key} is set by the sweep for each cell: remove it")
        try:
            check_value(key, None, where)  # unknown keys raise; None passes for optional keys
        except ConfigError as e:
            if "unknown config key" in str(e):
                raise SweepError(str(e)) from None


def load_sweep(path: str) -> Sweep:
    """Read, check and expand a sweep file. SweepError with one line for anything wrong."""
    raw = _read_json(path, "sweep file")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown sweep key {unknown[0]!r}: a sweep file has {', '.join(KEYS)}")
    if "base" not in raw:
        raise SweepError(f"{path}: no \"base\": name the config every cell starts from (\"base\": \"exp_config.json\")")
    base = raw["base"] if isinstance(raw["base"], dict) else _read_json(str(raw["base"]), "base config")
    changes = raw.get("set") or {}
    axes = raw.get("axes")
    if not isinstance(changes, dict):
        raise SweepError(f"{path}: \"set\" must be an object of config keys and values")
    if not isinstance(axes, dict) or not axes:
        raise SweepError(f"{path}: \"axes\" must be a non-empty object of config keys and lists of values, e.g. "
                         f"{{\"batch_size\": [1, 4]}}")
    _check_keys(f"{path} \"set\"", changes)
    _check_keys(f"{path} axes", axes)
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: axis {key!r} is {json.dumps(values)}: give a non-empty list of values")
        for v in values:
            try:
                check_value(key, v, f"{path} axis {key!r}")
            except ConfigError as e:
                raise SweepError(str(e)) from None
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise SweepError(f"{path}: axis {key!r} repeats a value: list each once")
    out = str(raw.get("out") or os.path.join("sweeps", os.path.splitext(os.path.basename(path))[0]))
    device_memory = _device_memory(path, raw.get("device_memory"))
    cells = []
    for n, point in enumerate(itertools.product(*axes.values())):
        values = dict(zip(axes, point))
        name = f"{n:02d}-" + "-".join(_slug(k, v) for k, v in values.items())
        config = {**base, **changes, **values}
        for key in PATH_KEYS:
            if isinstance(config.get(key), str):
                config[key] = os.path.abspath(config[key])
        cell_dir = os.path.abspath(os.path.join(out, "cells", name))
        config.update(output_path=os.path.join(cell_dir, "results.jsonl"), offload_folder=os.path.join(cell_dir, "offload"))
        if device_memory is not None and config.get("max_memory") is None:
            config["max_memory"] = device_memory  # the run checks it too, and offloading (max_cpu_memory) needs it
        config.pop("replica", None)
        config.pop("replicas", None)
        try:
            cfg = build_config(config)
        except ConfigError as e:
            raise SweepError(f"cell {name} ({', '.join(f'{k}={json.dumps(v)}' for k, v in values.items())}): {e}") from None
        cells.append(Cell(name, values, config, cfg))
    given = raw.get("reference")
    if given is not None:
        if not isinstance(given, dict):
            raise SweepError(f"{path}: \"reference\" must be an object of axis values, e.g. {{\"quantization\": \"none\"}}")
        if not any(all(c.values.get(k, c.config.get(k)) == v for k, v in given.items()) for c in cells):
            raise SweepError(f"{path}: no cell has reference {json.dumps(given)}: give values the axes take")
    return Sweep(path, out, axes, cells, device_memory, given)


def _device_memory(path: str, device_memory):
    if device_memory is not None:
        try:
            ok = isinstance(device_memory, (int, str)) and not isinstance(device_memory, bool) and \
                parse_bytes(device_memory) > 0
        except ValueError:
            ok = False
        if not ok:
            raise SweepError(f"{path}: device_memory={json.dumps(device_memory)} is not a byte count: write the budget "
                             f"of one rank's device, e.g. \"15GiB\"")
    return device_memory
