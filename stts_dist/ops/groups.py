"""g x g patch groups: the unit STTS keeps or drops and the connector pools into one LLM token."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def group_patches(x: torch.Tensor, grid: int, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (F, N=grid*grid, C) -> (F, G, g*g, C) grouped patches and a (G, g*g) bool validity mask
    (False where the grid was padded to a multiple of g)."""
    Fr, N, C = x.shape
    gp = -(-grid // g) * g
    xs = x.view(Fr, grid, grid, C)
    valid = torch.ones(grid, grid, dtype=torch.bool, device=x.device)
    if gp != grid:
        xs = F.pad(xs, (0, 0, 0, gp - grid, 0, gp - grid))
        valid = F.pad(valid, (0, gp - grid, 0, gp - grid), value=False)
    n = gp // g
    xs = xs.view(Fr, n, g, n, g, C).permute(0, 1, 3, 2, 4, 5).reshape(Fr, n * n, g * g, C)
    valid = valid.view(n, g, n, g).permute(0, 2, 1, 3).reshape(n * n, g * g)
    return xs, valid


def ungroup_mask(group_mask: torch.Tensor, grid: int, g: int) -> torch.Tensor:
    """(F, G) per-group values -> (F, grid*grid) per-patch values (each patch takes its group's)."""
    Fr, G = group_mask.shape
    n = int(round(G ** 0.5))
    up = group_mask.view(Fr, n, 1, n, 1).expand(Fr, n, g, n, g).reshape(Fr, n * g, n * g)
    return up[:, :grid, :grid].reshape(Fr, grid * grid)
