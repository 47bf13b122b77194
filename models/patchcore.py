"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Pipeline, with the paper's section / equation:
1. Locally aware patch features (Sec. 3.1, Eq. 1-2): every layer2 and layer3 position is described
   by its 3x3 neighbourhood, the layer3 grid is bilinearly resized to layer2's, and each layer's
   neighbourhood vector is adaptively average-pooled to ``embed_dim``; the layers are then pooled
   together to ``embed_dim`` (exactly the official code's PatchMaker + MeanMapper + Aggregator).
   The neighbourhood size (``patch_size``, p in Eq. 1) and the stages (``layers``, "2+3") are
   settings, as in the official code, so that the paper's ablation of both (Sec. 4.4.1)
   can be rerun; the finest stage given sets the patch grid.
2. Memory bank: greedy coreset of the training patches (Sec. 3.2, Alg. 1), ``models.coreset``.
3. Scoring (Sec. 3.3, Eq. 6): patch score = distance to the nearest bank patch (mean over the ``k``
   nearest when k > 1), image score = the largest patch score. The paper's Eq. 7 reweighting is
   available as ``reweight=b``; the official code does not use it, so it is off by default.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.backbone import onto_grid, stage_names
from models.base import AnomalyModel, Setting
from models.coreset import ORDERS, PRECISIONS, ApproximateGreedyCoreset, IdentitySampler
from models.knn import INDEXES, NearestNeighbours
from utils.errors import SettingError
from utils.parse import fraction, hierarchy, odd_positive_int, one_of, positive_int

log = logging.getLogger(__name__)

DEFAULT_LAYERS = "2+3"  # the paper's: mid-level features, neither too generic nor ImageNet-biased


def patch_origins(image_indices: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(image, row, column) of every patch of a batch, in ``embedding.flatten(0, 2)`` order."""
    image = image_indices.to(torch.int32)[:, None, None].expand(-1, height, width)
    rows = torch.arange(height, dtype=torch.int32)[None, :, None].expand(len(image_indices), -1, width)
    cols = torch.arange(width, dtype=torch.int32)[None, None, :].expand(len(image_indices), height, -1)
    return torch.stack([image, rows, cols], dim=-1).reshape(-1, 3)


def shard_runs(indices: torch.Tensor, per_shard: int):
    """(shard, first, end) of each run of consecutive batch positions whose images (dataset
    ``indices``) lie in one shard of ``per_shard`` images."""
    shards = (indices // per_shard).tolist()
    first = 0
    for position in range(1, len(shards) + 1):
        if position == len(shards) or shards[position] != shards[first]:
            yield shards[first], first, position
            first = position


def adaptive_pool_matrix(in_dim: int, out_dim: int) -> torch.Tensor:
    """[in_dim, out_dim] matrix P with x @ P == adaptive_avg_pool1d(x, out_dim) for any row x."""
    return F.adaptive_avg_pool1d(torch.eye(in_dim)[:, None, :], out_dim)[:, 0, :]


def reference_patch_embedding(feature_maps: list[torch.Tensor], embed_dim: int,
                              patch_size: int = 3) -> torch.Tensor:
    """Paper Sec. 3.1 / Eq. 1-2 written out as the official code computes it, step by step
    (shown for p = ``patch_size`` = 3):
    (i) unfold every position's 3x3 neighbourhood into a C*9 vector, ordered (c, dy, dx);
    (ii) resize a coarser layer's unfolded grid bilinearly onto the finest grid;
    (iii) adaptive-average-pool each layer's C*9 vector to ``embed_dim``;
    (iv) concatenate the layers and pool once more to ``embed_dim``.
    List of [B, C_l, H_l, W_l] (first = finest) -> [B, H_0, W_0, embed_dim]. Readable and slow
    (it materialises C*9 values per position); ``LocallyAwarePatchEmbedding`` computes the same
    map fast and is tested equal to this."""
    grid, p = feature_maps[0].shape[-2:], patch_size
    pooled = []
    for feature_map in feature_maps:
        batch, channels, height, width = feature_map.shape
        unfolded = F.unfold(feature_map, kernel_size=p, padding=p // 2).reshape(
            batch, channels * p * p, height, width)                                  # (i)
        unfolded = onto_grid(unfolded, grid, mode="bilinear")                          # (ii)
        vectors = unfolded.permute(0, 2, 3, 1).reshape(-1, 1, channels * p * p)
        pooled.append(F.adaptive_avg_pool1d(vectors, embed_dim))                       # (iii)
    joined = F.adaptive_avg_pool1d(torch.cat(pooled, dim=2), embed_dim)               # (iv)
    return joined.reshape(feature_maps[0].shape[0], *grid, embed_dim)


class LocallyAwarePatchEmbedding(nn.Module):
    """``reference_patch_embedding``'s result, computed without its dense work.

    Steps (iii) and (iv) together are one fixed linear map per layer, W_l = P_l @ A_l (P_l the
    layer's pooling matrix, A_l its rows of the final pooling matrix), and a channel-wise linear map
    commutes with bilinear resizing, so (ii) can come after it, on the few output channels instead
    of C*9.

    W_l is banded: adaptive pooling averages contiguous runs, so each output reads a short run of
    consecutive (c, dy, dx) entries -- the 3x3 neighbourhoods of at most G consecutive channels
    (G = 1-2 for MobileNetV2 and WideResNet-50) -- and each layer feeds only its own slice of the
    outputs (a half each for two layers). That is a grouped 3x3 convolution: output j is one group
    that reads its G channels, G*9 multiply-adds per output instead of C*9 for a dense map, and no
    unfolded C*9 neighbourhood is ever gathered. Equal to the reference to float rounding
    (tests/test_patchcore.py).
    """

    def __init__(self, channels: list[int], embed_dim: int = 1024, patch_size: int = 3):
        super().__init__()
        self.embed_dim, self.patch_size = embed_dim, patch_size
        final_pool = adaptive_pool_matrix(len(channels) * embed_dim, embed_dim)
        self.output_slices, self.reads_all_in_order = [], []
        p = patch_size
        for layer, c in enumerate(channels):
            layer_map = adaptive_pool_matrix(c * p * p, embed_dim) @ \
                final_pool[layer * embed_dim:(layer + 1) * embed_dim]  # [C*p*p, D]
            used = layer_map.ne(0).any(0).nonzero()[:, 0]
            first_out, end_out = int(used.min()), int(used.max()) + 1
            # [C, p, p, n] for the n outputs this layer feeds; row order is unfold's (c, dy, dx)
            band = layer_map[:, first_out:end_out].reshape(c, p, p, end_out - first_out)
            touched = band.ne(0).flatten(1, 2).any(1)  # [C, n]: channels each output reads
            first = touched.int().argmax(0)
            last = c - 1 - touched.flip(0).int().argmax(0)
            offsets = torch.arange(int((last - first).max()) + 1)[:, None]  # G
            group_channels = (first + offsets).clamp(max=c - 1).T  # [n, G]
            weight = band.permute(3, 0, 1, 2).gather(  # [n, G, p, p]
                1, group_channels[:, :, None, None].expand(-1, -1, p, p))
            inside = (first + offsets <= last).T[:, :, None, None]
            weight = torch.where(inside, weight, 0.0)
            order = group_channels.reshape(-1)  # group j reads input channels j*G .. j*G+G-1
            self.reads_all_in_order.append(torch.equal(order, torch.arange(c)))
            self.register_buffer(f"channels{layer}", order.contiguous())
            self.register_buffer(f"weight{layer}", weight.contiguous())
            self.output_slices.append((first_out, end_out))

    def forward(self, feature_maps: list[torch.Tensor]) -> torch.Tensor:
        """List of [B, C_l, H_l, W_l] (first = finest grid) -> [B, H_0, W_0, embed_dim]."""
        batch, grid = len(feature_maps[0]), feature_maps[0].shape[-2:]
        out = feature_maps[0].new_zeros(batch, self.embed_dim, *grid, dtype=torch.float32)
        for layer, feature_map in enumerate(feature_maps):
            weight = getattr(self, f"weight{layer}")
            x = feature_map.float()
            if not self.reads_all_in_order[layer]:  # WideResNet-50 needs no channel gather
                x = x.index_select(1, getattr(self, f"channels{layer}"))
            mapped = F.conv2d(x, weight, padding=self.patch_size // 2, groups=len(weight))
            mapped = onto_grid(mapped, grid, mode="bilinear")
            first_out, end_out = self.output_slices[layer]
            out[:, first_out:end_out] += mapped
        return out.permute(0, 2, 3, 1)


class PatchCore(AnomalyModel):
    settings = (
        Setting("k", "--k", positive_int, "nearest bank patches averaged into a patch score"),
        Setting("coreset_fraction", "--coreset", fraction,
                "fraction of training patches kept in the memory bank by the greedy coreset"),
        Setting("reweight", "--reweight", positive_int,
                "paper Eq. 7 image-score reweighting over B neighbours (default off, as the "
                "official code)"),
        Setting("knn_index", "--knn-index", one_of(INDEXES),
                "nearest-neighbour index of the bank: flat (exact, the paper's), flat-fp16 "
                "(float16 products, the best candidates re-ranked in float32; for GPUs), "
                "ivf-flat or hnsw (faiss's approximate ones, for large banks); what all but flat "
                "lose (recall@1, how much farther the neighbours found are) in metrics.json"),
        Setting("coreset_shard_size", "--coreset-shard-size", positive_int,
                "training patches per coreset shard: more are split into shards of whole "
                "images, each reduced by the greedy alone (composable coresets); the default is "
                "above every MVTec AD category, which keep the exact global greedy"),
        Setting("coreset_precision", "--coreset-precision", one_of(PRECISIONS),
                "fp32 (the paper's) or fp16: the greedy's per-pick pass over all patches in "
                "float16, each pick re-checked in float32 (half the memory traffic; for GPUs, "
                "where that pass is the coreset's cost)"),
        Setting("coreset_order", "--coreset-order", one_of(("auto",) + ORDERS),
                "how the exact greedy is evaluated, the same picks either way: eager (one pass "
                "over all patches per pick; a CUDA graph on GPUs), candidates (the farthest "
                "patch among a few kept exact, the rest as upper bounds; a fraction of the "
                "distance products), auto (candidates on CPUs, eager on GPUs)"),
        Setting("patch_size", "--patch-size", odd_positive_int,
                "p of Eq. 1: each patch feature aggregates its p x p neighbourhood on every "
                "stage (the paper ablates 1 to 9, Sec. 4.4.1)"),
        Setting("layers", "--layers", hierarchy,
                "backbone stages joined by '+', e.g. 1+2+3 (the paper ablates single stages and "
                "their pairs and triple, Sec. 4.4.1); the finest sets the patch grid"),
    )
    layers = stage_names(DEFAULT_LAYERS)  # the constructor's default, for the extractor
    resample = "bilinear"  # the official code's torchvision Resize default
    explainable = True
    sharded_fit = True
    memory_buffers = ("memory_bank", "provenance")

    def __init__(self, extractor, coreset_fraction: float = 0.1, k: int = 1,
                 embed_dim: int = 1024, reweight: int | None = None, seed: int = 0,
                 coreset_shard_size: int = 320_000, knn_index: str = "flat",
                 coreset_precision: str = "fp32", coreset_order: str = "auto",
                 patch_size: int = 3, layers: str = DEFAULT_LAYERS, device="cpu"):
        super().__init__(extractor, device)
        if patch_size < 1 or patch_size % 2 == 0:
            raise SettingError("patch_size", patch_size, "must be odd (a neighbourhood centred "
                               "on its patch); e.g. 3, the paper's")
        self.layers, self.patch_size = self.choose_layers(layers), patch_size
        if coreset_precision == "fp16" and coreset_order == "candidates":
            raise SettingError("coreset_order", coreset_order,
                               "has no {coreset_precision} fp16 variant (it is the eager "
                               "order's); pass one of the two, or {coreset_order} eager")
        self.coreset_precision, self.coreset_order = coreset_precision, coreset_order
        self.coreset_fraction, self.k, self.embed_dim = coreset_fraction, k, embed_dim
        self.reweight, self.seed, self.coreset_shard_size = reweight, seed, coreset_shard_size
        self.knn_index = knn_index
        self.patch_embedding = self.make_patch_embedding(extractor.channels())
        self.register_buffer("memory_bank", torch.empty(0, embed_dim))
        # Where each bank patch came from: (training image index, row, column) on the feature
        # grid -- what --explain shows; int32, a few KB beside the bank.
        self.register_buffer("provenance", torch.empty(0, 3, dtype=torch.int32))
        self.knn = NearestNeighbours(self.device, index=knn_index)
        self.to(self.device)

    def make_patch_embedding(self, channels: dict[str, int]) -> nn.Module | None:
        return LocallyAwarePatchEmbedding([channels[n] for n in self.layers], self.embed_dim,
                                          self.patch_size)

    def sampler(self, shard: int = 0):
        """The sampler of one shard; shard 0 (the only one at MVTec sizes) uses the seed as is."""
        if self.coreset_fraction >= 1:
            return IdentitySampler()
        return ApproximateGreedyCoreset(self.coreset_fraction, seed=self.seed + shard,
                                        progress=self.progress,
                                        precision=self.coreset_precision,
                                        order=None if self.coreset_order == "auto"
                                        else self.coreset_order)

    def shard_plan(self, n_images: int, patches_per_image: int) -> tuple[int, int]:
        """(images per shard, number of shards). Shards are whole images in data order, fixed by
        the data and ``coreset_shard_size`` alone (never by batch size or process count), so a
        shard's picks are the same wherever it is reduced."""
        per_shard = max(1, self.coreset_shard_size // patches_per_image)
        return per_shard, -(-n_images // per_shard)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.extractor(images)
        return self.patch_embedding([maps[name] for name in self.layers])

    @torch.no_grad()
    def fit(self, batches) -> None:
        """Embed the training images and keep the greedy coreset of their patches (Alg. 1).

        The patches are gathered shard by shard (``shard_plan``); when a shard is complete its
        coreset is taken and only the chosen rows are kept. With one shard -- every MVTec AD
        category at the default size -- this is the paper's global greedy exactly; with several,
        the union of the shards' greedy coresets, a constant-factor approximation of the global
        k-center objective (composable coresets: Indyk et al., PODS 2014; Malkomes et al.,
        NeurIPS 2015) whose memory is bounded by one shard plus the bank, not by all patches.
        """
        self.install_shards(self.reduce_shards(batches))

    @torch.no_grad()
    def reduce_shards(self, batches) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """shard -> (its chosen rows, their provenance) for the shards whose images ``batches``
        holds (a distributed fit gives each process some shards; the shard of an image is read
        from its index, so it does not matter which process reduces it)."""
        self.timings, parts = {}, {}
        buffer, origins, filled, current = None, [], 0, None
        per_shard = None
        for batch in self._timed_batches(batches):
            images = batch.images.to(self.device, non_blocking=True)
            with self.timed("embed_train"):
                embedding = self.in_parts(self.embed, images)  # [B, h, w, D]
            patches_per_image = embedding.shape[1] * embedding.shape[2]
            if per_shard is None:
                per_shard, n_shards = self.shard_plan(batches.n_images, patches_per_image)
                if n_shards > 1 and not self.quiet:
                    log.warning("%d training patches in %d images: greedy coreset on %d shards "
                                "of %d images (at most %d patches; coreset_shard_size %d), not "
                                "one global greedy", batches.n_images * patches_per_image,
                                batches.n_images, n_shards, per_shard,
                                per_shard * patches_per_image, self.coreset_shard_size)
                # One [rows, D] block per shard, filled in place and reused: no list of batches
                # and no concatenated copy of them.
                rows = min(per_shard, batches.n_images) * patches_per_image
                buffer = embedding.new_empty(rows, embedding.shape[-1])
            flat = embedding.reshape(len(images), patches_per_image, -1)
            for shard, first, end in shard_runs(batch.indices, per_shard):
                if current is not None and shard != current:
                    parts[current] = self._reduce_shard(current, buffer[:filled],
                                                        torch.cat(origins))
                    origins, filled = [], 0
                current = shard
                # Laying the patches out is part of embedding them: one copy per run of images
                # of one shard (a whole batch, but for the batch that crosses a shard boundary).
                with self.timed("embed_train"):
                    copied = (end - first) * patches_per_image
                    buffer[filled:filled + copied].view(end - first, patches_per_image, -1) \
                        .copy_(flat[first:end])
                    origins.append(patch_origins(batch.indices[first:end], *embedding.shape[1:3]))
                filled += copied
        if current is not None:
            parts[current] = self._reduce_shard(current, buffer[:filled], torch.cat(origins))
        return parts

    def patches_per_image(self, crop: int) -> int:
        """Patches of one ``crop`` x ``crop`` image: the grid of the first (finest) of its layers,
        which the patch embedding keeps (p x p neighbourhoods, zero-padded)."""
        _, height, width = self.extractor.shapes(crop)[self.layers[0]]
        return height * width

    def fit_plan(self, n_train: int, crop: int) -> dict[str, int]:
        """What a fit of ``n_train`` images takes, by count: patches per image, images per shard,
        shards, the patches of a full shard and of the last, and the bank's patches (the picks of
        all shards)."""
        per_image = self.patches_per_image(crop)
        per_shard, n_shards = self.shard_plan(n_train, per_image)
        shard_rows = min(per_shard, n_train) * per_image
        last_rows = n_train * per_image - (n_shards - 1) * shard_rows
        sampler = self.sampler()
        return {"per_image": per_image, "per_shard": per_shard, "shards": n_shards,
                "shard_rows": shard_rows, "last_rows": last_rows,
                "bank_rows": (n_shards - 1) * sampler.picks(shard_rows) + sampler.picks(last_rows)}

    def fit_memory(self, n_train: int, crop: int) -> dict[str, int]:
        """Bytes (4 per float32; D dims per patch, B the bank's patches, ``fit_plan``):
            shard   = min(images per shard, N) x P x D x 4   the patches of the shard being reduced
            coreset = the sampler's working memory on a shard  (``working_bytes``: the projection
                                                               and what the greedy's order keeps)
            bank    = B x D x 4 x 2                          the kept rows, and the search index's
                                                             copy"""
        plan = self.fit_plan(n_train, crop)
        return {"shard": plan["shard_rows"] * self.embed_dim * 4,
                "coreset": self.sampler().working_bytes(plan["shard_rows"], self.device),
                "bank": plan["bank_rows"] * self.embed_dim * 4 * 2}

    def _timed_batches(self, batches):
        """The batches, with the time spent reading them counted as embedding time."""
        iterator = iter(batches)
        while True:
            with self.timed("embed_train"):
                batch = next(iterator, None)
            if batch is None:
                return
            yield batch

    def _reduce_shard(self, shard: int, patches: torch.Tensor, origins: torch.Tensor):
        """(the shard's chosen rows, their provenance), copied out of the reused buffer."""
        with self.timed("coreset"):
            selected = self.sampler(shard).run(patches)
            return patches[selected], origins[selected.cpu()]

    def install_shards(self, parts: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The bank from every shard's picks, in shard order (so any split of the shards over
        processes gives the same bank)."""
        with self.timed("index"):
            order = sorted(parts)
            self.provenance = torch.cat([parts[s][1] for s in order]).to(self.device)
            self.set_memory_bank(torch.cat([parts[s][0] for s in order]).to(self.device))
        self.check_k(len(self.memory_bank), "patch", "raise {coreset_fraction}",
                     plural="patches")

    def set_memory_bank(self, bank: torch.Tensor) -> None:
        self.memory_bank = bank.contiguous()
        self.memory_loaded()

    def memory_loaded(self) -> None:
        self.knn.fit(self.memory_bank)

    def memory_summary(self) -> dict[str, int]:
        return {"bank_patches": len(self.memory_bank)}

    @property
    def approximate_search(self) -> bool:
        return self.knn_index != "flat"

    @torch.no_grad()
    def search_quality(self, images: torch.Tensor) -> dict | None:
        """With an approximate index: what it loses against exact search on these images'
        patches (``NearestNeighbours.search_quality``)."""
        if not self.approximate_search:
            return None
        queries = self.in_parts(self.embed, images).flatten(0, 2)
        return {"index": self.knn_index, **self.knn.search_quality(queries),
                "queries": len(queries)}

    def _search(self, images: torch.Tensor):
        """(queries [B*h*w, D], patch scores [B, h, w], bank indices [B*h*w, k]) of a batch."""
        embedding = self.embed(images)
        batch, height, width, dim = embedding.shape
        queries = embedding.reshape(-1, dim)
        distances, indices = self.knn.search(queries, self.k)
        return queries, distances.mean(1).reshape(batch, height, width), indices

    def score_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        queries, patch_scores, indices = self._search(images)
        image_scores, worst = patch_scores.flatten(1).max(1)
        if self.reweight:
            flat = torch.arange(len(images), device=worst.device) * patch_scores[0].numel() + worst
            image_scores = self._reweight(queries[flat], indices[flat, 0], image_scores)
        return image_scores, patch_scores

    @torch.no_grad()
    def nearest_bank_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch scores [B, h, w], bank row of every test patch's nearest normal patch
        [B, h, w]) from one embedding and search of the batch."""
        def search(part):
            _, patch_scores, indices = self._search(part)
            return patch_scores, indices[:, 0].reshape(patch_scores.shape)
        return self.in_parts(search, images)

    def _reweight(self, worst_patch, nearest_index, scores):
        """Paper Eq. 7: s = (1 - exp||m - m*|| / sum_{m' in N_b(m*)} exp||m - m'||) * s*.

        m is the test image's highest-scoring patch, m* its nearest bank patch and N_b(m*) the b
        nearest bank patches of m* (m* itself included). A test patch whose nearest normal patch sits
        in a sparse, unusual part of the bank gets a score closer to s*; one in a dense region less.
        """
        anchors = self.memory_bank[nearest_index.to(self.memory_bank.device)]
        _, support = self.knn.search(anchors, self.reweight)  # [B, b]
        support_patches = self.memory_bank[support.to(self.memory_bank.device)]
        worst_patch = worst_patch.to(support_patches.device)
        dist_support = (support_patches - worst_patch[:, None]).norm(dim=2)
        dist_anchor = (anchors - worst_patch).norm(dim=1)
        weight = 1 - torch.exp(dist_anchor - torch.logsumexp(dist_support, dim=1))
        return weight.to(scores.device) * scores
