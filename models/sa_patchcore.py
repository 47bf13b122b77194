"""SA-PatchCore (Ishida et al., "SA-PatchCore: Anomaly Detection in Dataset With Co-Occurrence
Relationships Using Self-Attention", IEEE Access 2023), on PatchCore's memory bank and scoring.

PatchCore describes a patch by its 3x3 neighbourhood only, so an image made of parts that are
each normal -- but never seen together -- looks normal patch by patch. SA-PatchCore gives every
layer3 patch image-wide context with a parameter-free self-attention, so a patch of object A
"knows" that object B is in the same image:

1. layer2: 3x3 average pool (stride 1, padding 1) -- local aggregation as in PatchCore.
2. layer3: 3x3 max pool, then self-attention over the spatial positions with queries = keys =
   values = the pooled map. As the official code does it, the attention is per channel: for
   channel c, position i attends to position j with weight softmax_j(x_ci * x_cj), and the output
   is sum_j weight_ij * x_cj (no projections, no scaling, nothing learned).
3. The two maps are joined at layer2's resolution by repeating each layer3 cell over the layer2
   cells it covers (nearest neighbour, the official ``embedding_concat``) and concatenated along
   channels (512 + 1024 = 1536 dims for WRN-50; no pooling to a fixed dimension).
4. Memory bank, coreset (default 1 %, the paper's) and scoring exactly as PatchCore: patch score =
   distance to the nearest bank patch, image score = the largest patch score.

Differences from the official code, on purpose: any backbone and input size work (it hard-codes
28x28 / 14x14 grids of WRN-50 at 224); the coreset is this project's greedy coreset on a 128-d
random projection (the official one runs k-center greedy on a sparse random projection).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.backbone import onto_grid
from models.patchcore import PatchCore


def channelwise_self_attention(x: torch.Tensor, max_elements: int = 1 << 26) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, H, W]: per channel, out_i = sum_j softmax_j(x_i * x_j) * x_j.

    The attention of one channel is a P x P matrix (P = H*W positions); channels are processed in
    chunks so that at most ``max_elements`` attention weights exist at once (WRN-50 at 224: 1024
    channels x 196 x 196 = 39 M per image).
    """
    batch, channels, height, width = x.shape
    flat = x.flatten(2)  # [B, C, P]
    positions = flat.shape[-1]
    out = torch.empty_like(flat)
    step = max(1, max_elements // max(1, batch * positions * positions))
    for start in range(0, channels, step):
        values = flat[:, start:start + step]                      # [B, c, P]
        logits = values[..., :, None] * values[..., None, :]      # [B, c, P, P]: x_i * x_j
        out[:, start:start + step] = (logits.softmax(dim=-1) @ values[..., None])[..., 0]
    return out.view(batch, channels, height, width)


class SAPatchCore(PatchCore):
    # Its two pools and the attention are built for layer2 + layer3: PatchCore's neighbourhood
    # size and stage choice are not SA-PatchCore's settings.
    settings = tuple(s for s in PatchCore.settings if s.name not in ("patch_size", "layers"))
    layers = ("layer2", "layer3")
    resample = "lanczos"  # the official code's PIL ANTIALIAS

    def __init__(self, extractor, coreset_fraction: float = 0.01, k: int = 1,
                 reweight: int | None = None, seed: int = 0, coreset_shard_size: int = 320_000,
                 knn_index: str = "flat", coreset_precision: str = "fp32",
                 coreset_order: str = "auto", device="cpu"):
        channels = extractor.channels()
        embed_dim = sum(channels[name] for name in self.layers)  # concatenation, no pooling
        super().__init__(extractor, coreset_fraction=coreset_fraction, k=k, embed_dim=embed_dim,
                         reweight=reweight, seed=seed, coreset_shard_size=coreset_shard_size,
                         knn_index=knn_index, coreset_precision=coreset_precision,
                         coreset_order=coreset_order, device=device)

    def make_patch_embedding(self, channels):
        return None  # PatchCore's 3x3 aggregation is replaced by the pools in ``embed``

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.extractor(images)
        local = F.avg_pool2d(maps["layer2"], 3, stride=1, padding=1)  # count_include_pad, as nn
        context = channelwise_self_attention(F.max_pool2d(maps["layer3"], 3, stride=1, padding=1))
        context = onto_grid(context, local.shape[-2:])
        return torch.cat([local, context], dim=1).permute(0, 2, 3, 1)
