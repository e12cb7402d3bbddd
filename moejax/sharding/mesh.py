"""Device meshes with named axes (pipeline, data, expert, tensor) and parameter shardings from logical axes."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from moejax.sharding.rules import DATA, EXPERT, MESH_AXES, PIPELINE, TENSOR, logical_to_spec


def make_mesh(tensor: int = 1, expert: int = 1, data: int = 1, devices=None, pipeline: int = 1) -> Mesh:
    """Devices numbered (pipeline, data, expert, tensor) from the outside in: a stage's devices are consecutive
    (with several processes, whole processes), the tensor ranks neighbours."""
    devices = list(jax.devices() if devices is None else devices)
    needed = tensor * expert * data * pipeline
    sizes = (f"pipeline_parallel_size={pipeline} x " if pipeline > 1 else "") + \
        f"data_parallel_size={data} x expert_parallel_size={expert} x tensor_parallel_size={tensor}"
    if needed > len(devices):
        raise ValueError(f"{sizes} needs {needed} devices; {len(devices)} are visible")
    if len(devices) % needed:
        raise ValueError(f"{sizes} = {needed} does not divide the {len(devices)} visible devices")
    grid = np.asarray(devices[:needed], dtype=object).reshape(pipeline, data, expert, tensor)
    return Mesh(grid, MESH_AXES)


def stage_mesh(mesh: Mesh, stage: int) -> Mesh:
    """The devices of one pipeline stage, as a mesh of the same axes (pipeline of size 1)."""
    return Mesh(mesh.devices[stage: stage + 1], mesh.axis_names)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape))


def sharding_for_axes(mesh: Mesh, axes, shape) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, mesh_shape(mesh), shape))


__all__ = ["DATA", "EXPERT", "PIPELINE", "TENSOR", "make_mesh", "mesh_shape", "sharding_for_axes", "stage_mesh"]
