"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework", ICPR 2020).

1. Embedding (Sec. 3.1): layer1, layer2, layer3 concatenated at layer1's resolution (coarser
   layers repeated over the cells they cover, what the reference code's unfold/fold
   ``embedding_concat`` does), then a random subset of ``dims`` channels (paper: 100 for
   ResNet-18, 550 for WideResNet-50), drawn exactly as the reference code draws it
   (``random.sample`` with seed 1024 + ``seed``: seed 0 gives the reference's subset). The
   stages are a setting (``layers``, "1+2+3"), so that the paper's ablation of them can be
   rerun; the finest sets the grid.
2. Fit (Sec. 3.2, Eq. 1): at every position ij a Gaussian N(mu_ij, Sigma_ij) of the training
   embeddings, Sigma_ij = sample covariance + eps * I (eps = 0.01).
3. Score (Eq. 2): Mahalanobis distance sqrt((x - mu)^T Sigma^-1 (x - mu)) per position, batched over
   positions with one matmul (no Python loop over positions). The map is upsampled and blurred
   like every method's; the image score is the maximum of that final map. Unlike the reference
   code we do not min-max normalise with test-set statistics (that leaks the test set and changes
   nothing in AUROC).
"""
from __future__ import annotations

import random

import torch

from models.backbone import onto_grid, stage_names
from models.base import AnomalyModel, Setting, cost_line, timed
from utils.errors import DataError, SettingError, non_finite
from utils.parse import hierarchy, positive_float, positive_int

PAPER_DIMS = {"resnet18": 100, "wide_resnet50_2": 550}
DEFAULT_LAYERS = "1+2+3"  # the paper's
REFERENCE_SEED = 1024  # xiahaifeng1995/PaDiM-Anomaly-Detection-Localization-master's random.seed


class PaDiM(AnomalyModel):
    settings = (
        Setting("dims", "--padim-dims", positive_int,
                "random channels of the stages kept (default: the paper's 100 for resnet18, 550 "
                "otherwise, at most all)"),
        Setting("eps", "--padim-eps", positive_float, "covariance regulariser: Sigma + eps I"),
        Setting("layers", "--layers", hierarchy,
                "backbone stages concatenated per position, joined by '+' (the paper ablates "
                "single stages and their combinations); the finest sets the grid"),
    )
    layers = stage_names(DEFAULT_LAYERS)  # the constructor's default, for the extractor
    resample = "lanczos"  # the reference code's PIL ANTIALIAS
    min_train_images = 2  # a sample covariance needs two
    image_score_from_map = True  # the paper's image score: max of the blurred full-size map
    memory_buffers = ("channel_subset", "mean", "precision")

    def __init__(self, extractor, dims: int | None = None, eps: float = 0.01, seed: int = 0,
                 layers: str = DEFAULT_LAYERS, device="cpu", position_chunk: int = 256):
        super().__init__(extractor, device)
        self.layers = self.choose_layers(layers)
        channels = sum(c for name, c in extractor.channels().items() if name in self.layers)
        dims = dims or min(PAPER_DIMS.get(extractor.name, 550), channels)
        if dims > channels:
            raise SettingError("dims", dims, f"is larger than the {channels} channels of "
                               f"{extractor.name} {'+'.join(self.layers)}; use at most "
                               f"{channels}")
        self.dims, self.eps, self.seed, self.position_chunk = dims, eps, seed, position_chunk
        subset = random.Random(REFERENCE_SEED + seed).sample(range(channels), dims)
        self.register_buffer("channel_subset", torch.tensor(subset))
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("precision", torch.empty(0))  # Sigma^-1 per position [P, d, d]
        self.to(self.device)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, 3, H, W] -> ([B, P, d], grid): the chosen channels of the pyramid per position."""
        maps = self.extractor(images)
        grid = tuple(maps[self.layers[0]].shape[-2:])
        stacked = torch.cat([onto_grid(maps[name], grid) for name in self.layers], dim=1)
        chosen = stacked.index_select(1, self.channel_subset)
        return chosen.flatten(2).transpose(1, 2), grid

    @torch.no_grad()
    def fit(self, batches) -> None:
        embeddings = [self.in_parts(lambda part: self.embed(part)[0],
                                    batch.images.to(self.device, non_blocking=True))
                      for batch in batches]
        embeddings = torch.cat(embeddings)  # [N, P, d]
        n_train = len(embeddings)
        if n_train < self.min_train_images:
            raise DataError(f"PaDiM needs at least {self.min_train_images} training images to "
                            f"estimate a covariance, got {n_train}")
        self.mean = embeddings.mean(0)  # [P, d]
        if not torch.isfinite(self.mean).all():  # NaN or inf in any embedding; not inverted
            raise non_finite("the training features")
        # float64 for the covariance and its inverse (as the reference's numpy), chunked over
        # positions so only a slice is ever held in double precision.
        chunk = self.position_chunk
        self.precision = torch.cat([self._precision(embeddings[:, start:start + chunk])
                                    for start in range(0, embeddings.shape[1], chunk)])

    def _precision(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[N, p, d] training embeddings of p positions -> [p, d, d] float32 (Sigma + eps I)^-1."""
        x = embeddings.double()
        centred = (x - x.mean(0)).transpose(0, 1)  # [p, N, d]
        identity = torch.eye(self.dims, device=x.device, dtype=torch.float64)
        covariance = centred.transpose(1, 2) @ centred / (len(x) - 1) + self.eps * identity
        return torch.linalg.inv(covariance).float()

    @staticmethod
    def _squared_mahalanobis(diff: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
        """(x - mu)^T Sigma^-1 (x - mu) of every position at once: [P, B, d], [P, d, d] ->
        [P, B]."""
        return ((diff @ precision) * diff).sum(2).clamp_(min=0)

    def memory_summary(self) -> dict[str, int]:
        return {"gaussian_positions": int(self.mean.shape[0])}

    def fit_memory(self, n_train: int, crop: int) -> dict[str, int]:
        """Bytes (N training images, P positions, d channels, p = ``position_chunk``):
            features   = N x P x d x 4             every training embedding, held until fitted
            gaussians  = P x (d + d x d) x 4       the means and precision matrices kept
            covariance = p x (2 x N x d + 3 x d x d) x 8
                                                   one chunk's float64 embeddings, centred copy,
                                                   covariance, its inverse and the solver's copy"""
        _, height, width = self.extractor.shapes(crop)[self.layers[0]]  # the grid, as ``embed``
        positions, d = height * width, self.dims
        chunk = min(positions, self.position_chunk)
        return {"features": n_train * positions * d * 4,
                "gaussians": positions * (d + d * d) * 4,
                "covariance": chunk * (2 * n_train * d + 3 * d * d) * 8}

    @torch.no_grad()
    def estimate(self, n_train: int, n_test: int, probe: torch.Tensor) -> dict:
        """Memory: ``fit_memory``. Fit: N forward passes, plus the Gaussians: per chunk a + b x N
        (the covariance grows with the images, the inverse does not), both timed on random
        embeddings of one chunk at two image counts. Test: a forward pass and the Mahalanobis
        product per image, the product timed on one chunk of positions."""
        positions, d = self.embed(probe)[0].shape[1], self.dims  # also the warm-up
        forward = timed(self.device, self.embed, probe) / len(probe)
        chunk = min(positions, self.position_chunk)
        chunks = -(-positions // chunk)
        sizes = (16, 64)
        self._precision(torch.randn(sizes[0], chunk, d, device=self.device))  # warm-up
        seconds = [timed(self.device, self._precision,
                         torch.randn(m, chunk, d, device=self.device)) for m in sizes]
        gaussians = chunks * cost_line(sizes, seconds)(n_train)
        diff = torch.randn(chunk, len(probe), d, device=self.device)
        precision = torch.randn(chunk, d, d, device=self.device)
        self._squared_mahalanobis(diff, precision)  # warm-up
        product = timed(self.device, self._squared_mahalanobis, diff, precision)
        return {"memory_bytes": self.fit_memory(n_train, probe.shape[-1]),
                "fit_seconds": n_train * forward + gaussians,
                "test_seconds": n_test * (forward + chunks * product / len(probe))}

    def score_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding, (height, width) = self.embed(images)
        diff = (embedding - self.mean).transpose(0, 1)  # [P, B, d]
        squared = self._squared_mahalanobis(diff, self.precision)
        distances = squared.sqrt().transpose(0, 1).reshape(len(images), height, width)
        return distances.amax(dim=(1, 2)), distances
