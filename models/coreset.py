"""Memory-bank subsampling strategies; each has one ``run(features) -> indices``.

``ApproximateGreedyCoreset`` is PatchCore's Algorithm 1 (Roth et al., CVPR 2022) as the official code
runs it: features are first mapped to 128 dims by a random linear projection (Johnson-Lindenstrauss),
then k-center greedy repeatedly takes the patch farthest from everything chosen so far. The
official "approximate" variant starts the minimum distances at the mean distance to 10 random
patches instead of from an N x N matrix; we do the same, and like it we only ever hold O(N) distances
-- one matrix-vector product per selected patch. Squared distances are kept throughout: the
arg-max and the running minimum are unchanged by squaring non-negative numbers, and a square root per
patch per iteration is saved.
"""
from __future__ import annotations

import math

import torch
from tqdm import tqdm


class IdentitySampler:
    """Keep every patch (``--coreset 1.0``)."""

    def run(self, features: torch.Tensor) -> torch.Tensor:
        return torch.arange(len(features), device=features.device)


class RandomSampler:
    """A uniform random subset of the same size: the baseline greedy coreset must beat."""

    def __init__(self, fraction: float, seed: int = 0):
        self.fraction, self.seed = fraction, seed

    def run(self, features: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        n_select = max(1, int(len(features) * self.fraction))
        return torch.randperm(len(features), generator=generator)[:n_select].to(features.device)


class ApproximateGreedyCoreset:
    def __init__(self, fraction: float, projection_dim: int = 128, n_starts: int = 10,
                 seed: int = 0, progress: bool = True):
        if not 0 < fraction <= 1:
            raise ValueError(f"coreset fraction must be in (0, 1], got {fraction}")
        self.fraction, self.projection_dim = fraction, projection_dim
        self.n_starts, self.seed, self.progress = n_starts, seed, progress

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Random linear map to ``projection_dim`` dims, seeded; the official code's nn.Linear init."""
        dim = features.shape[1]
        if dim <= self.projection_dim:
            return features.float()
        generator = torch.Generator().manual_seed(self.seed)
        bound = 1.0 / math.sqrt(dim)  # torch.nn.Linear's default uniform(-1/sqrt(d), 1/sqrt(d))
        weight = (torch.rand(dim, self.projection_dim, generator=generator) * 2 - 1) * bound
        weight = weight.to(features.device)
        # Chunked so that a float16/bfloat16 bank is upcast a slice at a time, never whole.
        return torch.cat([chunk.float() @ weight for chunk in features.split(65536)])

    @torch.no_grad()
    def run(self, features: torch.Tensor) -> torch.Tensor:
        n_total = len(features)
        n_select = max(1, int(n_total * self.fraction))
        if self.fraction >= 1 or n_select >= n_total:
            return torch.arange(n_total, device=features.device)
        z = self.project(features)
        sq_norms = (z * z).sum(1)
        generator = torch.Generator().manual_seed(self.seed)
        starts = torch.randperm(n_total, generator=generator)[: min(self.n_starts, n_total)]
        starts = starts.to(z.device)

        def squared_distances_to(rows: torch.Tensor) -> torch.Tensor:  # [N, len(rows)]
            # ||a||^2 - 2 a.b + ||b||^2, in place on the [N, len(rows)] product: scaling z itself
            # would rewrite the whole N x 128 matrix every iteration.
            dot = z @ z[rows].T
            return dot.mul_(-2).add_(sq_norms[:, None]).add_(sq_norms[rows][None]).clamp_(min=0)

        # Start value: mean (true, not squared) distance to the random start points, squared.
        min_sq = squared_distances_to(starts).sqrt_().mean(1).square_()
        selected = torch.empty(n_select, dtype=torch.long, device=z.device)
        steps = tqdm(range(n_select), desc="coreset", leave=False, disable=not self.progress,
                     mininterval=1.0)
        for step in steps:
            # No .item(): the index stays on the device, so a GPU never waits for the host.
            farthest = torch.argmax(min_sq, dim=0, keepdim=True)
            selected[step:step + 1] = farthest
            torch.minimum(min_sq, squared_distances_to(farthest)[:, 0], out=min_sq)
        return selected
