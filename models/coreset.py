"""Memory-bank subsampling strategies; each has one ``run(features) -> indices``.

``ApproximateGreedyCoreset`` is PatchCore's Algorithm 1 (Roth et al., CVPR 2022) as the official code
runs it: features are first mapped to 128 dims by a random linear projection (Johnson-Lindenstrauss),
then k-center greedy repeatedly takes the patch farthest from everything chosen so far. The
official "approximate" variant starts the minimum distances at the mean distance to 10 random
patches instead of from an N x N matrix; we do the same, and like it we only ever hold O(N) distances.
``reference_greedy_coreset`` below is that algorithm line by line; read it first.

The fast paths keep squared distances (the arg-max and the running minimum are unchanged by
squaring non-negative numbers, and a square root per patch per pick is saved) and evaluate the same
greedy in one of two exact orders (identical picks up to ties and float rounding; the tests compare
both with the reference):
- eager (GPU): every pick updates all N minimum distances with the new centre in one
  matrix-vector product, and the arg-max stays on the device, so the host never waits. A pick is
  four small kernels whose launch cost from Python exceeds their work, so on CUDA a run of
  ``graph_steps`` picks is captured once as a CUDA graph and replayed;
- lazy (CPU): the minimum distances only ever decrease, so the maximum a block of patches had when
  it was last updated is an upper bound on its maximum now. Each pick takes the block with the
  highest bound; if that block is up to date, its maximum is the global one, otherwise it is
  updated with all centres chosen since its last update (one small matrix-matrix product that
  stays in cache) and the search repeats. The arithmetic is about the eager loop's, but it runs as
  cache-resident matrix products instead of one pass over the whole projection per pick, which on
  a CPU is bound by memory bandwidth (timings: benchmarks/RESULTS.md).

``precision="fp16"`` (an option, not the paper's) halves the bytes each eager pick reads: the
update GEMV runs on a float16 copy of the projection, which alone changes the picks -- the greedy
is chaotic, and one pick decided by a rounding error changes all later ones. So every pick is
re-checked exactly: the ``RECHECK_CANDIDATES`` patches with the largest approximate minimum
distance get their exact float32 minimum over every centre chosen so far, and the farthest of them
by that exact value is taken. The pick then equals the float32 greedy's whenever the true farthest
patch is among those candidates, i.e. whenever float16 rounding moves it fewer than that many
places down the ranking (how often that holds on real patches: benchmarks/RESULTS.md).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

PRECISIONS = ("fp32", "fp16")
# Candidates re-checked in float32 per float16 pick: the wider, the more often the true farthest
# patch is among them (how often, on real patches: benchmarks/RESULTS.md). The check reads every
# centre chosen so far once whatever the width, so a wide one costs little more than a narrow one.
RECHECK_CANDIDATES = 32


def random_projection(features: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Features mapped to ``dim`` dims by a seeded random linear map (the official code's
    ``torch.nn.Linear`` default init, uniform(-1/sqrt(d), 1/sqrt(d))); unchanged if already small."""
    in_dim = features.shape[1]
    if in_dim <= dim:
        return features.float()
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(in_dim)
    weight = ((torch.rand(in_dim, dim, generator=generator) * 2 - 1) * bound).to(features.device)
    # Chunked so that a float16/bfloat16 bank is upcast a slice at a time, never whole, and
    # written in place: no list of chunk results beside their concatenation.
    projected = torch.empty(len(features), dim, device=features.device)
    for start in range(0, len(features), 65536):
        torch.matmul(features[start:start + 65536].float(), weight,
                     out=projected[start:start + 65536])
    return projected


def reference_greedy_coreset(features: torch.Tensor, fraction: float, projection_dim: int = 128,
                             n_starts: int = 10, seed: int = 0) -> torch.Tensor:
    """PatchCore's Algorithm 1 (approximate greedy coreset), plainly; the oracle of the fast paths.

        z = random projection of every patch
        d(i) = mean distance of z_i to n_starts random patches       (the official approximation)
        repeat n_select times:
            c = argmax_i d(i)                                          (the farthest patch)
            select c;  d(i) = min(d(i), ||z_i - z_c||)  for every i

    O(N) memory, one pass over all N patches per pick."""
    z = random_projection(features, projection_dim, seed)
    n_select = max(1, int(len(z) * fraction))
    if fraction >= 1 or n_select >= len(z):
        return torch.arange(len(z), device=features.device)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randperm(len(z), generator=generator)[:min(n_starts, len(z))].to(z.device)
    nearest = torch.cdist(z, z[starts]).mean(1)
    selected = []
    for _ in range(n_select):
        farthest = int(nearest.argmax())
        selected.append(farthest)
        nearest = torch.minimum(nearest, torch.cdist(z, z[farthest][None])[:, 0])
    return torch.tensor(selected, device=features.device)


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
                 seed: int = 0, progress: bool = True, lazy: bool | None = None,
                 block_size: int = 1024, graph_steps: int | None = None,
                 precision: str = "fp32"):
        if not 0 < fraction <= 1:
            raise ValueError(f"coreset fraction must be in (0, 1], got {fraction}")
        if precision not in PRECISIONS:
            raise ValueError(f"coreset precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {precision}")
        self.precision = precision  # fp16: eager float16 GEMV with float32 re-check, any device
        self.fraction, self.projection_dim = fraction, projection_dim
        self.n_starts, self.seed, self.progress = n_starts, seed, progress
        self.lazy, self.block_size = lazy, block_size  # lazy None: lazy on the CPU, eager on GPUs
        # Iterations per CUDA-graph replay (None: 64 on CUDA, no graph elsewhere; 0: no graph).
        self.graph_steps = graph_steps

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return random_projection(features, self.projection_dim, self.seed)

    @torch.no_grad()
    def run(self, features: torch.Tensor) -> torch.Tensor:
        n_total = len(features)
        n_select = max(1, int(n_total * self.fraction))
        if self.fraction >= 1 or n_select >= n_total:
            return torch.arange(n_total, device=features.device)
        z = self.project(features)
        if self.precision == "fp16":
            # A shift leaves distances unchanged and a common scale leaves the arg-max unchanged:
            # rows centred and scaled to unit mean norm keep float16 far from overflow, and the
            # dot products small beside the distances they are subtracted from.
            z = z - z.mean(0)
            z /= z.norm(dim=1).mean().clamp(min=torch.finfo(z.dtype).tiny)
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
        steps = tqdm(range(n_select), desc="coreset", leave=False, disable=not self.progress,
                     mininterval=1.0)
        if self.precision == "fp16":
            return self._half_greedy(z, sq_norms, min_sq, steps)
        lazy = self.lazy if self.lazy is not None else z.device.type == "cpu"
        if lazy:
            return self._lazy_greedy(z, sq_norms, min_sq, steps)
        return self._eager_greedy(z, sq_norms, min_sq, steps)

    def _eager_greedy(self, z, sq_norms, min_sq, steps) -> torch.Tensor:
        """Update all N minimum distances per pick; on CUDA as replays of a captured graph."""
        n_total = len(z)
        # Augmented rows make one matrix-vector product the whole squared distance:
        #   [z_i, |z_i|^2, 1] . [-2 z_c, 1, |z_c|^2] = |z_i|^2 - 2 z_i.z_c + |z_c|^2,
        # so an iteration needs no separate norm gathers or adds (fewer kernels per pick).
        # Columns padded to a multiple of 4 keep every row 16-byte aligned for the GEMV.
        width = -(-(z.shape[1] + 2) // 4) * 4
        rows = z.new_zeros(n_total, width)
        rows[:, :z.shape[1]] = z
        rows[:, z.shape[1]] = sq_norms
        rows[:, z.shape[1] + 1] = 1
        centres = z.new_zeros(n_total, width)  # only the picked row is ever read
        torch.mul(z, -2, out=centres[:, :z.shape[1]])
        centres[:, z.shape[1]] = 1
        centres[:, z.shape[1] + 1] = sq_norms
        distance = z.new_empty(n_total)
        zero = z.new_zeros(())

        def pick(out: torch.Tensor) -> None:
            # No .item(): the index stays on the device, so a GPU never waits for the host.
            farthest = torch.argmax(min_sq, dim=0, keepdim=True)
            out.copy_(farthest)
            torch.mv(rows, centres.index_select(0, farthest)[0], out=distance)
            # min(min_sq, max(distance, 0)) in one pass: clamp's lower bound guards rounding below 0
            torch.clamp(distance, min=zero, max=min_sq, out=min_sq)

        return self._repeat(pick, steps, z.device)

    def _half_greedy(self, z, sq_norms, min_sq, steps) -> torch.Tensor:
        """The eager loop on a float16 copy of the projection, each pick re-checked in float32
        (module docstring). Every shape is fixed, so it replays as a CUDA graph like the eager
        loop: the centres chosen so far live in a preallocated block, rows not yet filled
        at +inf squared norm, and a device-side counter says where the next one goes."""
        n_total, n_select = len(z), len(steps)
        half = z.half()
        initial = min_sq.clone()  # the start value: part of every exact minimum
        n_candidates = min(RECHECK_CANDIDATES, n_total)
        centres = z.new_zeros(n_select, z.shape[1])
        centres_sq = z.new_full((n_select,), math.inf)
        filled = torch.zeros(1, dtype=torch.long, device=z.device)
        distance = z.new_empty(n_total)
        zero = z.new_zeros(())

        def pick(out: torch.Tensor) -> None:
            candidates = torch.topk(min_sq, n_candidates, sorted=False).indices
            rows = z.index_select(0, candidates)
            # exact ||r||^2 - 2 r.c + ||c||^2 over every centre so far (+inf for unfilled rows)
            exact = torch.addmm(centres_sq[None], rows, centres.T, alpha=-2).amin(1)
            exact.add_(sq_norms.index_select(0, candidates))
            exact = torch.minimum(exact, initial.index_select(0, candidates)).clamp_(min=0)
            min_sq.index_copy_(0, candidates, exact)
            farthest = candidates.index_select(0, torch.argmax(exact, dim=0, keepdim=True))
            out.copy_(farthest)
            centres.index_copy_(0, filled, z.index_select(0, farthest))
            centres_sq.index_copy_(0, filled, sq_norms.index_select(0, farthest))
            filled.add_(1)
            # Approximate update of all N: float16 products (half the bytes of the float32 GEMV),
            # norms and the running minimum in float32.
            dot = torch.mv(half, half.index_select(0, farthest)[0])
            torch.add(sq_norms, dot, alpha=-2, out=distance)
            distance.add_(sq_norms.index_select(0, farthest))
            torch.clamp(distance, min=zero, max=min_sq, out=min_sq)

        return self._repeat(pick, steps, z.device)

    def _repeat(self, pick, steps, device) -> torch.Tensor:
        """``pick(out)`` once per step (each writes one index into ``out``); on CUDA replayed
        as a graph of ``graph_steps`` picks."""
        n_select = len(steps)
        selected = torch.empty(n_select, dtype=torch.long, device=device)
        chunk = self.graph_steps if self.graph_steps is not None else (
            64 if device.type == "cuda" else 0)
        done = 0
        if chunk and device.type == "cuda" and n_select >= 2 * chunk:
            # Warm-up iterations on a side stream (cuBLAS handles, allocator) are real picks.
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for step in range(chunk):
                    pick(selected[step:step + 1])
            torch.cuda.current_stream(device).wait_stream(stream)
            done = chunk
            steps.update(chunk)
            picked = torch.empty(chunk, dtype=torch.long, device=device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # recorded, not run: no pick happens here
                for step in range(chunk):
                    pick(picked[step:step + 1])
            while n_select - done >= chunk:
                graph.replay()
                selected[done:done + chunk].copy_(picked)
                done += chunk
                steps.update(chunk)
        for step in range(done, n_select):
            pick(selected[step:step + 1])
        steps.update(n_select - done)
        steps.close()
        return selected

    def _lazy_greedy(self, z, sq_norms, min_sq, steps) -> torch.Tensor:
        """The same picks as the eager loop; see the module docstring for why it is exact."""
        size, n_total = self.block_size, len(z)
        n_blocks = -(-n_total // size)
        padded = min_sq.new_full((n_blocks * size,), -math.inf)
        padded[:n_total] = min_sq
        bound = padded.view(n_blocks, size).amax(1).cpu().numpy().astype(np.float64)
        applied = np.zeros(n_blocks, dtype=np.int64)  # centres already applied to each block
        centres_scaled = z.new_empty(len(steps), z.shape[1])  # -2 c, so that one addmm gives
        centres_sq = z.new_empty(len(steps))                  # ||c||^2 - 2 z.c
        selected = np.empty(len(steps), dtype=np.int64)
        for step in steps:
            while True:
                block = int(bound.argmax())
                first = applied[block]
                if first == step:
                    break  # up to date and highest: holds the global maximum
                lo, hi = block * size, min(block * size + size, n_total)
                nearest = torch.addmm(centres_sq[first:step][None], z[lo:hi],
                                      centres_scaled[first:step].T).amin(1)
                nearest.add_(sq_norms[lo:hi]).clamp_(min=0)
                torch.minimum(min_sq[lo:hi], nearest, out=min_sq[lo:hi])
                bound[block] = float(min_sq[lo:hi].max())
                applied[block] = step
            lo = block * size
            farthest = lo + int(min_sq[lo:lo + size].argmax())
            selected[step] = farthest
            torch.mul(z[farthest], -2, out=centres_scaled[step])
            centres_sq[step] = sq_norms[farthest]
        return torch.from_numpy(selected).to(z.device)
