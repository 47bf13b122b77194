"""L2 nearest-neighbour search over a memory bank, kept apart from feature extraction.

Exact by default. Backends, chosen from the device: faiss on the GPU when the faiss GPU build is
installed, else chunked torch matmul + top-k, on the GPU or the CPU. On the CPU torch's matrix
product found the same neighbours 4-5x faster than faiss-cpu's flat index, whose search was most
of a CPU run's test time (benchmarks/RESULTS.md). Distances are true L2 (the papers' ||a - b||);
faiss itself returns squared L2, so we take the root. Memory stays bounded for any bank: the torch
path works in blocks of queries x bank rows, and faiss's flat search blocks its distance matrix
itself. On a GPU a block holds all bank rows (``max_chunk_elements`` in all: few, large products);
on a CPU it is a ``tile`` x ``tile`` tile that stays in the cores' caches, and each query keeps its
best k over the tiles (the same neighbours; timings in benchmarks/RESULTS.md).

``index="ivf-flat"`` or ``"hnsw"`` trade exactness for speed on large banks (faiss's inverted
lists over k-means cells, probing ``IVF_PROBES`` of them; or its HNSW graph): off by default, and
``search_quality`` measures what they lose against the exact search on the same queries. A
PatchCore bank is full of near-duplicates (thousands of patches of plain background), and an HNSW
graph built with faiss's default effort (efConstruction 40) links such clusters too sparsely: a
search that enters the wrong one returns a patch several times farther than the nearest, and an
image score, the maximum over its patches, takes that error whole. Hence ``HNSW_BUILD``
(measured on bottle's full bank: benchmarks/RESULTS.md).

``index="flat-fp16"`` is for GPUs, whose tensor cores multiply float16 many times faster than
float32: every query is compared with every bank row in float16 (after subtracting the bank's
mean, which leaves distances unchanged but removes the large common part that float16 would
round the differences away against, and scaling rows to at most unit norm, so no product
overflows), the ``k + RERANK_EXTRA`` best are re-ranked by their exact
float32 distance, and those are returned. The result is the exact one whenever the true k nearest
are among the candidates, i.e. unless float16 rounding moves one of them more than
``RERANK_EXTRA`` places down; ``search_quality`` measures how often that happens.
"""
from __future__ import annotations

import numpy as np
import torch

from utils.errors import non_finite


def _faiss():
    import faiss  # imported on use: the torch GPU path needs no faiss at all
    return faiss


def _faiss_has_gpu() -> bool:
    try:
        faiss = _faiss()
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


INDEXES = ("flat", "flat-fp16", "ivf-flat", "hnsw")
RERANK_EXTRA = 16    # flat-fp16: candidates beyond k re-ranked in float32 (benchmarks/RESULTS.md)
RERANK_ELEMENTS = 1 << 26  # flat-fp16: gathered candidate rows per block, in floats (256 MB)
CPU_TILE = 1024      # exact search on a CPU: queries and bank rows per distance tile (4 MB)
IVF_PROBES = 8       # cells searched per query
HNSW_NEIGHBOURS = 32  # graph degree
HNSW_BUILD = 200      # candidate list while building (efConstruction; faiss's default is 40)
HNSW_SEARCH = 64      # candidate list while searching (efSearch)


def _approximate_index(faiss, dim: int, kind: str, bank: np.ndarray):
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS)
        index.hnsw.efConstruction, index.hnsw.efSearch = HNSW_BUILD, HNSW_SEARCH
        return index
    # about 4 sqrt(N) cells, at least 39 training points each (faiss's k-means minimum)
    cells = max(1, min(int(4 * np.sqrt(len(bank))), len(bank) // 39))
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, cells)
    index.train(bank)
    index.nprobe = min(IVF_PROBES, cells)
    return index


class NearestNeighbours:
    """``fit(bank)`` once, then ``search(query, k) -> (distances [Q,k], indices [Q,k])`` (torch)."""

    def __init__(self, device: torch.device | str = "cpu", max_chunk_elements: int = 1 << 28,
                 index: str = "flat", tile: int | None = None):
        self.device = torch.device(device)
        self.max_chunk_elements = max_chunk_elements  # query x bank distance block, in floats
        # exact search: queries and bank rows per tile; None: CPU_TILE on a CPU, and on a GPU
        # the whole bank in blocks of max_chunk_elements
        self.tile = tile or (CPU_TILE if self.device.type == "cpu" else None)
        self.kind = index
        if index == "flat-fp16":
            self.backend = "torch-fp16"
        elif index != "flat":
            self.backend = "faiss-cpu"  # the approximate indexes are faiss's (on the CPU here)
        elif self.device.type == "cuda" and _faiss_has_gpu():
            self.backend = "faiss-gpu"
        else:
            self.backend = "torch"
        self.bank: torch.Tensor | None = None
        self.index = None

    def fit(self, bank: torch.Tensor) -> "NearestNeighbours":
        bank = bank.detach().float()
        # faiss's k-means stops on NaN with a C++ traceback, and its HNSW graph searches a NaN
        # bank without a word, returning the largest float as a distance: scores that look real
        if not torch.isfinite(bank).all():
            raise non_finite("the memory bank's features")
        if self.backend.startswith("torch"):
            self.bank = bank.to(self.device).contiguous()
            self.bank_sq = (self.bank * self.bank).sum(1)
            if self.backend == "torch-fp16":
                self.centre = self.bank.mean(0)
                centred = self.bank - self.centre
                self.centred_sq = (centred * centred).sum(1)
                self.scale = float(self.centred_sq.max().clamp(min=1e-30).sqrt())
                self.bank_half = (centred / self.scale).half()
            return self
        array = np.ascontiguousarray(bank.cpu().numpy(), dtype=np.float32)
        faiss = _faiss()
        index = faiss.IndexFlatL2(array.shape[1]) if self.kind == "flat" else \
            _approximate_index(faiss, array.shape[1], self.kind, array)
        if self.backend == "faiss-gpu":
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(array)
        self.index, self.bank = index, bank
        return self

    def __len__(self) -> int:
        return 0 if self.bank is None else len(self.bank)

    @torch.no_grad()
    def search(self, query: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bank is None:
            raise RuntimeError("search() before fit()")
        k = min(k, len(self))
        if self.backend == "torch":
            return self._search_torch(query.to(self.device, torch.float32), k)
        if self.backend == "torch-fp16":
            return self._search_reranked(query.to(self.device, torch.float32), k)
        array = np.ascontiguousarray(query.detach().float().cpu().numpy())
        if self.kind != "flat" and not np.isfinite(array).all():  # (a flat search gives NaN)
            raise non_finite("the features searched")
        squared, indices = self.index.search(array, k)
        distances = torch.from_numpy(squared).clamp_(min=0).sqrt_()
        return distances.to(query.device), torch.from_numpy(indices).to(query.device)

    def _search_torch(self, query: torch.Tensor, k: int):
        if self.tile is None:
            rows, cols = max(1, self.max_chunk_elements // len(self.bank)), len(self.bank)
        else:
            rows, cols = self.tile, self.tile
        out_d, out_i = [], []
        for start in range(0, len(query), rows):
            q = query[start:start + rows]
            best_d = best_i = None
            for first in range(0, len(self.bank), cols):
                # ||q - b||^2 = ||q||^2 - 2 q.b + ||b||^2, one block at a time. A query's
                # ||q||^2 is the same for every bank row, so it is added to the k chosen values
                # only, not to the whole block (one pass less over it); and for k = 1 a minimum,
                # half the time of a top-k on a CPU (benchmarks/RESULTS.md).
                partial = torch.addmm(self.bank_sq[None, first:first + cols], q,
                                      self.bank[first:first + cols].T, alpha=-2.0)
                if k == 1:
                    d, i = partial.min(dim=1, keepdim=True)
                else:
                    d, i = partial.topk(min(k, partial.shape[1]), dim=1, largest=False)
                i += first
                if best_d is None:
                    best_d, best_i = d, i
                elif k == 1:  # ties keep the earlier tile's row, as one minimum over all would
                    closer = d < best_d
                    best_d, best_i = torch.where(closer, d, best_d), torch.where(closer, i, best_i)
                else:
                    best_d, j = torch.cat([best_d, d], 1).topk(
                        min(k, best_d.shape[1] + d.shape[1]), dim=1, largest=False)
                    best_i = torch.cat([best_i, i], 1).gather(1, j)
            best_d += (q * q).sum(1, keepdim=True)
            out_d.append(best_d.clamp_(min=0).sqrt_())
            out_i.append(best_i)
        return torch.cat(out_d), torch.cat(out_i)

    def _search_reranked(self, query: torch.Tensor, k: int):
        """float16 products pick ``k + RERANK_EXTRA`` candidates, float32 distances rank them."""
        n_candidates = min(k + RERANK_EXTRA, len(self.bank))
        chunk = max(1, min(self.max_chunk_elements // len(self.bank),
                           RERANK_ELEMENTS // (n_candidates * self.bank.shape[1])))
        out_d, out_i = [], []
        for start in range(0, len(query), chunk):
            q = query[start:start + chunk]
            product = torch.mm(((q - self.centre) / self.scale).half(), self.bank_half.T)
            # ||b||^2 - 2 q.b orders a query's bank rows as ||q - b||^2 does (||q||^2 is common),
            # here for the centred rows
            key = torch.add(self.centred_sq[None], product.float(), alpha=-2 * self.scale ** 2)
            candidates = key.topk(n_candidates, dim=1, largest=False).indices
            # exact, and without the cancellation of the expanded form: sum of squared differences
            exact = (self.bank[candidates] - q[:, None]).square_().sum(2)
            d, j = exact.topk(k, dim=1, largest=False)
            out_d.append(d.sqrt_())
            out_i.append(candidates.gather(1, j))
        return torch.cat(out_d), torch.cat(out_i)

    @torch.no_grad()
    def search_quality(self, query: torch.Tensor) -> dict[str, float]:
        """What this index loses against an exact search of the same bank on ``query``:
        ``recall_at_1``, the share of rows whose nearest bank row it finds, and how much farther
        than the nearest the row it returns is, relative (``distance_excess_mean`` / ``_max``;
        0 for the exact index). Recall alone misleads both ways: in a bank of near-duplicates
        another row at almost the same distance counts as a miss yet changes no score, while
        one miss that lands far away raises an image score (a maximum) by all of its excess."""
        if self.kind == "flat":
            return {"recall_at_1": 1.0, "distance_excess_mean": 0.0, "distance_excess_max": 0.0}
        # the exact search where the bank is: in a GPU run on the GPU, not on its CPU, where a
        # test batch's patches against the whole bank would weigh on every category's metrics
        # (a faiss index keeps the bank as it was given, possibly elsewhere)
        query, bank = query.detach().float().to(self.device), self.bank.to(self.device)
        found = self.search(query, 1)[1][:, 0]  # on the query's device, as every search returns
        truth = NearestNeighbours(self.device).fit(bank).search(query, 1)[1][:, 0]
        # both distances from the difference itself, not the expanded form the searches use,
        # whose rounding would make the same row look farther; the same row is no excess
        found_d = (bank[found] - query).norm(dim=1)
        true_d = (bank[truth] - query).norm(dim=1)
        excess = torch.where(found == truth, 0.0,
                             (found_d - true_d).clamp(min=0) / true_d.clamp(min=1e-30))
        return {"recall_at_1": float((found == truth).float().mean()),
                "distance_excess_mean": float(excess.mean()),
                "distance_excess_max": float(excess.max())}
