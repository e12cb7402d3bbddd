"""Device meshes with named axes (data, expert, tensor) and parameter shardings from logical axes."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from moejax.sharding.rules import DATA, EXPERT, MESH_AXES, TENSOR, logical_to_spec


def make_mesh(tensor: int = 1, expert: int = 1, data: int = 1, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    needed = tensor * expert * data
    if needed > len(devices):
        raise ValueError(
            f"data_parallel_size={data} x expert_parallel_size={expert} x tensor_parallel_size={tensor} "
            f"needs {needed} devices; {len(devices)} are visible")
    if len(devices) % needed:
        raise ValueError(
            f"data_parallel_size={data} x expert_parallel_size={expert} x tensor_parallel_size={tensor} = {needed} "
            f"does not divide the {len(devices)} visible devices")
    grid = np.asarray(devices[:needed], dtype=object).reshape(data, expert, tensor)
    return Mesh(grid, MESH_AXES)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape))


def sharding_for_axes(mesh: Mesh, axes, shape) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, mesh_shape(mesh), shape))


__all__ = ["DATA", "EXPERT", "TENSOR", "make_mesh", "mesh_shape", "sharding_for_axes"]
