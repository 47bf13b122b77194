"""SPADE (Cohen & Hoshen, "Sub-Image Anomaly Detection with Deep Pyramid Correspondences", 2020).

1. Image level (Sec. 3.1): every image is one vector, the global average pool of the backbone's last
   stage; image score = mean L2 distance to its K nearest training images (paper K = 50).
2. Pixel level (Sec. 3.2): the gallery of a test image is the pyramid features (layer1-3) of its K
   nearest training images; each test pixel's score is the L2 distance to its nearest gallery
   feature of the same layer (kappa = 1). The per-layer maps are upsampled to the input size and
   averaged; the Gaussian blur (sigma 4) is applied outside the model like for every method.

Memory stays bounded: each test image searches its own K-image gallery with one exact kNN call
per layer (``models.knn`` blocks the work), never a test-pixels x all-train-pixels matrix.
"""
from __future__ import annotations

import torch

from models.base import AnomalyModel, Setting, timed
from models.knn import NearestNeighbours
from utils.anomaly_map import upsample
from utils.parse import positive_int

PYRAMID = ("layer1", "layer2", "layer3")


class SPADE(AnomalyModel):
    settings = (Setting("k", "--k", positive_int,
                        "nearest training images: the image score's and the pixel gallery's"),)
    layers = ("layer1", "layer2", "layer3", "layer4")
    resample = "lanczos"  # the reference code's PIL ANTIALIAS
    memory_buffers = tuple(f"train_{name}" for name in PYRAMID) + ("train_pooled",)

    def __init__(self, extractor, k: int = 50, device="cpu"):
        super().__init__(extractor, device)
        self.k = k
        for name in PYRAMID:
            self.register_buffer(f"train_{name}", torch.empty(0))
        self.register_buffer("train_pooled", torch.empty(0))
        self.to(self.device)

    def features(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        maps = self.extractor(images)
        pooled = maps["layer4"].mean(dim=(2, 3))  # global average pool of the last stage
        return {name: maps[name] for name in PYRAMID}, pooled

    @torch.no_grad()
    def fit(self, batches) -> None:
        pyramid, pooled = {name: [] for name in PYRAMID}, []
        for batch in batches:
            images = batch.images.to(self.device, non_blocking=True)
            maps, vectors = self.in_parts(self.features, images)
            for name in PYRAMID:
                pyramid[name].append(maps[name])
            pooled.append(vectors)
        for name in PYRAMID:
            setattr(self, f"train_{name}", torch.cat(pyramid[name]))
        self.train_pooled = torch.cat(pooled)
        self.memory_loaded()
        self.check_k(len(self.train_pooled), "training image", "add training images")

    def memory_loaded(self) -> None:
        self.image_knn = NearestNeighbours(self.device).fit(self.train_pooled)

    def fit_memory(self, n_train: int, crop: int) -> dict[str, int]:
        """The gallery: every training image's layer1-3 maps and its pooled layer4 vector, float32
        (4 bytes a number)."""
        shapes = self.extractor.shapes(crop)
        per_image = sum(c * h * w for c, h, w in (shapes[name] for name in PYRAMID)) \
            + shapes["layer4"][0]
        return {"gallery": n_train * per_image * 4}

    @torch.no_grad()
    def estimate(self, n_train: int, n_test: int, probe: torch.Tensor) -> dict:
        """Memory: ``fit_memory``. Fit: n_train forward passes. Test: each test image's forward
        and its searches in its K images' maps, timed on the probe against a gallery of copies of
        the probe's own (a search's cost depends only on the sizes)."""
        self.check_k(n_train, "training image", "add training images")
        maps, pooled = self.features(probe)  # also the warm-up
        forward = timed(self.device, self.features, probe) / len(probe)
        copies = -(-self.k // len(probe))  # ceil: at least K gallery images
        for name in PYRAMID:
            setattr(self, f"train_{name}", maps[name].repeat(copies, 1, 1, 1))
        self.train_pooled = pooled.repeat(copies, 1)
        self.memory_loaded()
        self.score_patches(probe)  # warm-up
        scoring = timed(self.device, self.score_patches, probe) / len(probe)
        return {"memory_bytes": self.fit_memory(n_train, probe.shape[-1]),
                "fit_seconds": n_train * forward, "test_seconds": n_test * scoring}

    def memory_summary(self) -> dict[str, int]:
        return {"gallery_images": len(self.train_pooled)}

    def score_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps, pooled = self.features(images)
        distances, neighbours = self.image_knn.search(pooled, self.k)
        image_scores = distances.mean(1)
        size = images.shape[-2:]
        pixel_scores = torch.zeros(len(images), *size, device=self.device)
        for i in range(len(images)):
            for name in PYRAMID:
                train = getattr(self, f"train_{name}")[neighbours[i].to(self.device)]  # [K,C,h,w]
                gallery = train.permute(0, 2, 3, 1).reshape(-1, train.shape[1])
                test = maps[name][i]
                queries = test.permute(1, 2, 0).reshape(-1, test.shape[0])
                nearest, _ = NearestNeighbours(self.device).fit(gallery).search(queries, 1)
                layer_map = nearest.to(self.device).reshape(1, *test.shape[1:])
                pixel_scores[i] += upsample(layer_map, size)[0] / len(PYRAMID)
        return image_scores, pixel_scores
