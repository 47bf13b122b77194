"""Memory-bank subsampling strategies; each has one ``run(features) -> indices``.

``ApproximateGreedyCoreset`` is PatchCore's Algorithm 1 (Roth et al., CVPR 2022) as the official code
runs it: features are first mapped to 128 dims by a random linear projection (Johnson-Lindenstrauss),
then k-center greedy repeatedly takes the patch farthest from everything chosen so far. The
official "approximate" variant starts the minimum distances at the mean distance to 10 random
patches instead of from an N x N matrix; we do the same, and like it we only ever hold O(N) distances.
``reference_greedy_coreset`` below is that algorithm line by line; read it first.

The fast paths keep squared distances (the arg-max and the running minimum are unchanged by
squaring non-negative numbers, and a square root per patch per pick is saved) and evaluate the same
greedy in one of two exact orders (identical picks up to ties and float rounding; the tests
compare each with the reference):
- eager (GPU): every pick updates all N minimum distances with the new centre in one
  matrix-vector product, and the arg-max stays on the device, so the host never waits. A pick is
  four small kernels whose launch cost from Python exceeds their work, so on CUDA a run of
  ``graph_steps`` picks is captured once as a CUDA graph and replayed. Each pick reads the whole
  projection: the loop is bound by memory bandwidth.
- candidates (CPU): a patch's minimum distance only ever decreases, so a value computed before
  some picks is an upper bound on it after them. Only M = ``CANDIDATES`` patches, those of the
  largest minimum at the last update, have their minimum kept exact, by one M-row product per
  pick; the best of them is the farthest patch of all as long as it is no smaller than the
  largest bound of every other patch (one number, kept from that update). When it is smaller,
  the candidates are chosen afresh: the patches of the highest bounds are brought up to date
  with the picks they lack (matrix-matrix products, one per group of patches that lack the
  same picks), in growing numbers until the (M+1)-th largest exact value among them is no
  smaller than every bound left out. Patches whose bound is low never need the picks made
  meanwhile, so the greedy does a fraction of the eager loop's products, as matrix-matrix
  products (counts and timings: benchmarks/RESULTS.md). On CUDA a run of ``graph_steps``
  candidate picks can be a graph (``order="candidates"``): each pick also records whether it was
  valid, the host reads the flags once per run and keeps the picks before the first invalid one.

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

import torch
from tqdm import tqdm

from utils.errors import non_finite

PRECISIONS = ("fp32", "fp16")
ORDERS = ("eager", "candidates")
# Patches kept exact between updates in the candidates order: more make updates rarer but every
# pick dearer (how many updates each takes on real patches: benchmarks/RESULTS.md).
CANDIDATES = 1024
# Picks per CUDA-graph replay by default: a replay's launch and the host's read between replays
# are paid once per this many picks (timings per size: benchmarks/RESULTS.md).
GRAPH_STEPS = 64
# An update's distance products go in blocks of at most this many values (64 MB in float32) over
# at most UPDATE_ROWS patches: its memory is bounded whatever the number of patches and picks.
UPDATE_PRODUCTS, UPDATE_ROWS = 1 << 24, 1 << 16
# Candidates re-checked in float32 per float16 pick: the wider, the more often the true farthest
# patch is among them (how often, on real patches: benchmarks/RESULTS.md). The check reads every
# centre chosen so far once whatever the width, so a wide one costs little more than a narrow one.
RECHECK_CANDIDATES = 32


def random_projection(features: torch.Tensor, dim: int, seed: int,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Features mapped to ``dim`` dims by a seeded random linear map (the official code's
    ``torch.nn.Linear`` default init, uniform(-1/sqrt(d), 1/sqrt(d))); unchanged if already small.
    ``out``: where to write it, e.g. the first columns of ``projected_rows``'s rows."""
    in_dim = features.shape[1]
    if in_dim <= dim:
        return features.float() if out is None else out.copy_(features)
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(in_dim)
    weight = ((torch.rand(in_dim, dim, generator=generator) * 2 - 1) * bound).to(features.device)
    # Chunked so that a float16/bfloat16 bank is upcast a slice at a time, never whole, and
    # written in place: no list of chunk results beside their concatenation.
    projected = torch.empty(len(features), dim, device=features.device) if out is None else out
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


def augmented_width(dim: int) -> int:
    """Columns of an augmented row of ``dim`` dims: the dims, two more, padded to 4."""
    return -(-(dim + 2) // 4) * 4


def projected_rows(features: torch.Tensor, dim: int, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, z, |z|^2): [z_i, |z_i|^2, 1] per row, z the random projection, zero-padded to a
    multiple of 4 columns (16-byte aligned rows for the GEMV). With ``augmented_centres``, one dot
    product is a whole squared distance,
        [z_i, |z_i|^2, 1] . [-2 z_c, 1, |z_c|^2] = |z_i|^2 - 2 z_i.z_c + |z_c|^2,
    so a pick needs no separate norm gathers or adds (fewer kernels per pick), and a block of
    distances is one matrix product with no bias to broadcast into it. The projection is written
    straight into the first columns: z and |z|^2 are views of these rows, never a second
    N x ``dim`` copy beside them."""
    width = min(dim, features.shape[1])
    rows = torch.zeros(len(features), augmented_width(width), device=features.device)
    z = random_projection(features, dim, seed, out=rows[:, :width])
    for start in range(0, len(z), 65536):  # |z|^2 in slices: no N x dim temporary of squares
        part = z[start:start + 65536]
        torch.sum(part * part, 1, out=rows[start:start + 65536, width])
    rows[:, width + 1] = 1
    return rows, z, rows[:, width]


def augmented_centres(z: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """[-2 z_c, 1, |z_c|^2] per row, padded as ``projected_rows``."""
    dim = z.shape[1]
    centres = z.new_zeros(len(z), augmented_width(dim))
    torch.mul(z, -2, out=centres[:, :dim])
    centres[:, dim] = 1
    centres[:, dim + 1] = sq_norms
    return centres


def captured(run, device) -> "torch.cuda.CUDAGraph":
    """``run()`` once on a side stream, then recorded (not run) as a CUDA graph of the same
    kernels. The first run creates what capture cannot (cuBLAS handles, allocations); its work
    is real, so the caller finds its results in place, as after a replay."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph


def kept(n_patches: int, fraction: float) -> int:
    """Patches a sampler keeps of ``n_patches`` at ``fraction``: at least one, at most all."""
    return n_patches if fraction >= 1 else min(n_patches, max(1, int(n_patches * fraction)))


class IdentitySampler:
    """Keep every patch (``--coreset 1.0``)."""

    def run(self, features: torch.Tensor) -> torch.Tensor:
        return torch.arange(len(features), device=features.device)

    def picks(self, n_patches: int) -> int:
        return n_patches

    def working_bytes(self, n_patches: int, device) -> int:
        return 8 * n_patches  # the indices


class RandomSampler:
    """A uniform random subset of the same size: the baseline greedy coreset must beat."""

    def __init__(self, fraction: float, seed: int = 0):
        self.fraction, self.seed = fraction, seed

    def run(self, features: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(features), generator=generator)
        return order[:self.picks(len(features))].to(features.device)

    def picks(self, n_patches: int) -> int:
        return kept(n_patches, self.fraction)

    def working_bytes(self, n_patches: int, device) -> int:
        return 8 * n_patches  # the permutation


class ApproximateGreedyCoreset:
    def __init__(self, fraction: float, projection_dim: int = 128, n_starts: int = 10,
                 seed: int = 0, progress: bool = True, order: str | None = None,
                 graph_steps: int | None = None,
                 precision: str = "fp32"):
        if not 0 < fraction <= 1:
            raise ValueError(f"coreset fraction must be in (0, 1], got {fraction}")
        if precision not in PRECISIONS:
            raise ValueError(f"coreset precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {precision}")
        self.precision = precision  # fp16: eager float16 GEMV with float32 re-check, any device
        self.fraction, self.projection_dim = fraction, projection_dim
        self.n_starts, self.seed, self.progress = n_starts, seed, progress
        if order is not None and order not in ORDERS:
            raise ValueError(f"coreset order must be one of {', '.join(ORDERS)}, got {order}")
        if precision == "fp16" and order == "candidates":
            raise ValueError("coreset precision fp16 is a variant of the eager order, "
                             "not of the candidates order")
        self.order = order  # None: candidates on the CPU, eager on GPUs
        # After a run in the candidates order: how often candidates were chosen afresh, and the
        # distance products that took (the eager loop's are N x picks).
        self.updates = self.updated_products = None
        # Picks per CUDA-graph replay (None: GRAPH_STEPS on CUDA, no graph elsewhere; 0: no graph).
        self.graph_steps = graph_steps

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return random_projection(features, self.projection_dim, self.seed)

    def picks(self, n_patches: int) -> int:
        return kept(n_patches, self.fraction)

    def resolved_order(self, device: torch.device | str) -> str:
        """The order a run on ``device`` takes: the one asked for, else candidates on the CPU and
        eager on GPUs (the fp16 precision is a variant of the eager order)."""
        if self.precision == "fp16":
            return "eager"
        return self.order or ("candidates" if torch.device(device).type == "cpu" else "eager")

    def working_bytes(self, n_patches: int, device: torch.device | str) -> int:
        """Bytes a run on ``n_patches`` patches holds beside them at its peak, counted from the
        tensors it allocates: the projection, its squared norms and running minima, and per
        order the eager loop's augmented rows and centres, the candidates order's augmented rows
        and pick counts, or the fp16 loop's float16 copy and start values."""
        dim = self.projection_dim
        augmented = augmented_width(dim)
        block = 0
        if self.precision == "fp16":
            per_patch = dim * 4 + 4 + 4  # z, sq_norms, min_sq
            # half, initial, distance; or, earlier, the centred copy of z beside z
            per_patch += max(dim * 2 + 4 + 4, dim * 4)
        elif self.resolved_order(device) == "candidates":
            per_patch = augmented * 4 + 4 + 8  # the rows (z and sq_norms in them), min_sq, applied
            # an update's block of products, the rows it gathers and their minima
            rows = min(n_patches, UPDATE_ROWS)
            block = 4 * (min(UPDATE_PRODUCTS, rows * self.picks(n_patches))
                         + rows * (augmented + 2))
        else:
            per_patch = 2 * augmented * 4 + 4 + 4  # rows (z in them), centres, min_sq, distance
        # (the start distances, N x n_starts, are freed before any of the order's own tensors)
        return n_patches * per_patch + block

    @torch.no_grad()
    def run(self, features: torch.Tensor) -> torch.Tensor:
        n_total = len(features)
        n_select = self.picks(n_total)
        if n_select == n_total:
            return torch.arange(n_total, device=features.device)
        if self.precision == "fp16":
            z = self.project(features)
            # A shift leaves distances unchanged and a common scale leaves the arg-max unchanged:
            # rows centred and scaled to unit mean norm keep float16 far from overflow, and the
            # dot products small beside the distances they are subtracted from.
            z = z - z.mean(0)
            z /= z.norm(dim=1).mean().clamp(min=torch.finfo(z.dtype).tiny)
            sq_norms = (z * z).sum(1)
        else:
            rows, z, sq_norms = projected_rows(features, self.projection_dim, self.seed)
        # A NaN never compares larger, so the candidates order would wait forever for a bound
        # to settle (and the eager one would pick at random): |z|^2 is NaN or inf wherever a
        # patch's projection is, one read of N numbers.
        if not torch.isfinite(sq_norms).all():
            raise non_finite("the patch features to subsample")
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
        order = self.resolved_order(z.device)
        greedy = self._candidate_greedy if order == "candidates" else self._eager_greedy
        return greedy(rows, z, sq_norms, min_sq, steps)

    def _eager_greedy(self, rows, z, sq_norms, min_sq, steps) -> torch.Tensor:
        """Update all N minimum distances per pick; on CUDA as replays of a captured graph.
        ``rows``: the augmented rows; ``z`` and ``sq_norms``: views of their columns."""
        n_total = len(z)
        centres = augmented_centres(z, sq_norms)  # only the picked row is ever read
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
        chunk = self.graph_steps if self.graph_steps is not None else GRAPH_STEPS
        done = 0
        if chunk and device.type == "cuda" and n_select >= 2 * chunk:
            picked = torch.empty(chunk, dtype=torch.long, device=device)

            def run_chunk():
                for step in range(chunk):
                    pick(picked[step:step + 1])

            graph = captured(run_chunk, device)
            while True:  # the capture's warm-up run made the first chunk's picks
                selected[done:done + chunk].copy_(picked)
                done += chunk
                steps.update(chunk)
                if n_select - done < chunk:
                    break
                graph.replay()
        for step in range(done, n_select):
            pick(selected[step:step + 1])
        steps.update(n_select - done)
        steps.close()
        return selected

    def _candidate_greedy(self, all_rows, z, sq_norms, min_sq, steps) -> torch.Tensor:
        """The eager loop's picks with exact minima kept for ``CANDIDATES`` patches only, and the
        candidates chosen afresh when the best of them is no longer provably the farthest patch
        (module docstring). ``z`` and ``sq_norms``: views of the augmented rows' columns."""
        n_total, n_select = len(z), len(steps)
        n_candidates = min(CANDIDATES, n_total - 1)
        index = torch.empty(n_candidates, dtype=torch.long, device=z.device)
        # the candidates' augmented rows and centre rows (refresh fills them)
        rows = all_rows.new_empty(n_candidates, all_rows.shape[1])
        centres = torch.empty_like(rows)
        nearest = z.new_empty(n_candidates)  # the candidates' exact minimum squared distances
        bound = z.new_empty(1)               # >= the minimum of every patch not a candidate
        distance, best, zero = z.new_empty(n_candidates), z.new_empty(1), z.new_zeros(())
        selected = torch.empty(n_select, dtype=torch.long, device=z.device)
        # Picks already applied to each patch's min_sq: it is exact for those, and an upper bound
        applied = torch.zeros(n_total, dtype=torch.long, device=z.device)
        self.updates = self.updated_products = 0

        def bring_up_to_date(patches: torch.Tensor, done: int) -> None:
            """Apply the picks each of ``patches`` lacks, up to ``done``, to its min_sq."""
            firsts, order = torch.sort(applied.index_select(0, patches))
            firsts, counts = torch.unique_consecutive(firsts, return_counts=True)
            # one group per earlier update: the patches it left with the same picks applied
            groups = patches.index_select(0, order).split(counts.tolist())
            for first, group in zip(firsts.tolist(), groups):
                chosen = selected[first:done]
                if not len(chosen):
                    continue
                self.updated_products += len(group) * len(chosen)
                chosen_centres = augmented_centres(z.index_select(0, chosen),
                                                   sq_norms.index_select(0, chosen)).T
                for part in group.split(min(UPDATE_ROWS, max(1, UPDATE_PRODUCTS // len(chosen)))):
                    near = (all_rows.index_select(0, part) @ chosen_centres).amin(1).clamp_(min=0)
                    min_sq.index_copy_(0, part, torch.minimum(min_sq.index_select(0, part), near))
            applied.index_fill_(0, patches, done)

        def refresh(done: int) -> None:
            """New candidates: the patches of the largest exact min_sq after ``done`` picks.
            Only patches whose upper bound could place them there are brought up to date: the
            highest bounds, in growing numbers, until the (M+1)-th largest exact value among
            them is no smaller than every bound left out."""
            self.updates += 1
            count = 4 * (n_candidates + 1)
            while True:
                count = min(count, n_total)
                highest = torch.topk(min_sq, min(count + 1, n_total))  # bounds, before updating
                patches = highest.indices[:count]
                left_out = float(highest.values[count]) if count < n_total else -math.inf
                bring_up_to_date(patches, done)
                top = torch.topk(min_sq.index_select(0, patches), n_candidates + 1)
                if float(top.values[-1]) >= left_out:
                    break
                count *= 2
            # In position order, so that a tie goes to the lowest position, as argmax over all
            index.copy_(patches[top.indices[:n_candidates]].sort().values)
            bound.fill_(max(float(top.values[-1]), left_out))
            torch.index_select(all_rows, 0, index, out=rows)
            centres.copy_(augmented_centres(z.index_select(0, index),
                                            sq_norms.index_select(0, index)))
            torch.index_select(min_sq, 0, index, out=nearest)

        def pick(slot: torch.Tensor, valid: torch.Tensor) -> None:
            # the best candidate; no .item(), so a GPU never waits for the host
            torch.max(nearest, 0, keepdim=True, out=(best, slot))
            torch.ge(best, bound, out=valid)
            torch.mv(rows, centres.index_select(0, slot)[0], out=distance)
            torch.clamp(distance, min=zero, max=nearest, out=nearest)

        # Picks per run: a graph's on CUDA; elsewhere 1, unless graph_steps asks for runs of more
        # (the same drop-and-redo logic without a graph, which is how the tests check it).
        cuda = z.device.type == "cuda"
        default = GRAPH_STEPS if cuda else 1
        chunk = max(1, self.graph_steps if self.graph_steps is not None else default)
        slots = torch.empty(chunk, dtype=torch.long, device=z.device)
        valids = torch.empty(chunk, dtype=torch.bool, device=z.device)

        def run_chunk():
            for step in range(chunk):
                pick(slots[step:step + 1], valids[step:step + 1])

        refresh(0)
        # A captured graph's warm-up run makes the first chunk's picks.
        graph = captured(run_chunk, z.device) if cuda and chunk > 1 else run_chunk()
        done = 0
        while True:
            # Picks after an invalid one were made from stale minima: dropped, and redone from
            # fresh candidates. The first pick from fresh candidates is always valid.
            flags = valids.cpu()
            n_valid = chunk if bool(flags.all()) else int(flags.int().argmin())
            take = min(n_valid, n_select - done)
            selected[done:done + take] = index[slots[:take]]
            done += take
            steps.update(take)
            if done == n_select:
                break
            if n_valid < chunk:
                refresh(done)
            graph.replay() if graph is not None else run_chunk()
        steps.close()
        return selected
