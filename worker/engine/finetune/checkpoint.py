"""Training checkpoints without pickle: the adapter's weights, the optimizer's state and the loop's position,
as safetensors + JSON, so that a retried attempt resumes where the lost one last saved.

A checkpoint is a directory `step-<N>` holding `adapter.safetensors` (the trainable parameters by name),
`optimizer.safetensors` (every tensor of the optimizer's state, keyed `<param index>/<name>`) and
`state.json` (the optimizer's scalar state and param groups, the scheduler's state, the step, the loss
history, the RNG state as a list of bytes). It is written beside its final name and renamed into place,
and only the newest is kept: a kill during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_VERSION = 1


def _named_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save(directory: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
         loop_state: dict[str, Any]) -> Path:
    """Write checkpoint `step` under `directory` (atomically) and remove older ones; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step}"
    tmp = directory / f".step-{step}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({n: p.detach().to("cpu").contiguous() for n, p in _named_trainable(model).items()},
              str(tmp / "adapter.safetensors"))
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {
        "version": STATE_VERSION, "step": step, "optimizer_scalars": scalars,
        "param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(),
        "cpu_rng": torch.get_rng_state().tolist(),
        "loop": loop_state,
    }
    (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
    os.replace(tmp, final)
    for old in directory.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(directory: Path | None) -> Path | None:
    """The newest complete checkpoint under `directory`, or None."""
    if directory is None or not directory.is_dir():
        return None
    found = []
    for d in directory.glob("step-*"):
        try:
            found.append((int(d.name.split("-", 1)[1]), d))
        except ValueError:
            continue
    complete = [(n, d) for n, d in found if (d / "state.json").is_file()]
    return max(complete)[1] if complete else None


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore the checkpoint at `path` into the model, optimizer and scheduler; returns its state."""
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"checkpoint version {state.get('version')} is not {STATE_VERSION}")
    weights = load_file(str(path / "adapter.safetensors"))
    params = _named_trainable(model)
    if set(weights) != set(params):
        raise ValueError("the checkpoint's adapter does not match this job's adapter")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    tensors = load_file(str(path / "optimizer.safetensors"))
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split("/", 1)
        opt_state.setdefault(int(index), {})[name] = value
    for index, scalars in state["optimizer_scalars"].items():
        opt_state.setdefault(int(index), {}).update(scalars)
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(torch.tensor(state["cpu_rng"], dtype=torch.uint8))
    return state
