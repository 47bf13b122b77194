"""Greedy coreset: O(N) memory, better coverage than random, deterministic."""
import subprocess
import sys
import textwrap

import pytest
import torch

from models.coreset import (ApproximateGreedyCoreset, IdentitySampler, RandomSampler,
                            reference_greedy_coreset)
from tests.conftest import REPO, interrupted_after


def covering_radius(features, selected):
    """max over all points of the distance to the nearest selected point (k-center objective)."""
    return torch.cdist(features, features[selected]).min(1).values.max().item()


def clustered(n=3000, dim=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    # one dense mode and a few small far-away clusters: random sampling tends to miss the latter
    dense = torch.randn(n - 60, dim, generator=g)
    far = [torch.randn(10, dim, generator=g) * 0.3 + 12 * torch.randn(1, dim, generator=g)
           for _ in range(6)]
    return torch.cat([dense, *far])


def test_greedy_covers_better_than_random_subset_of_same_size():
    features = clustered()
    greedy = ApproximateGreedyCoreset(0.02, progress=False).run(features)
    random = RandomSampler(0.02).run(features)
    assert len(greedy) == len(random) == 60
    assert len(set(greedy.tolist())) == 60, "a patch was selected twice"
    assert covering_radius(features, greedy) < 0.8 * covering_radius(features, random)


def test_same_seed_same_selection_and_other_seed_differs():
    features = clustered(seed=1)
    a = ApproximateGreedyCoreset(0.05, seed=3, progress=False).run(features)
    b = ApproximateGreedyCoreset(0.05, seed=3, progress=False).run(features)
    c = ApproximateGreedyCoreset(0.05, seed=4, progress=False).run(features)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_full_fraction_keeps_everything():
    features = torch.randn(50, 8)
    assert torch.equal(ApproximateGreedyCoreset(1.0).run(features), torch.arange(50))
    assert torch.equal(IdentitySampler().run(features), torch.arange(50))


# For a subprocess measuring its own memory, in bytes: VmRSS now, and VmHWM, the peak of this
# program's image (ru_maxrss would also count the pre-exec copy of the parent, here pytest's).
MEMORY = textwrap.dedent("""
    def status(field):
        with open("/proc/self/status") as lines:
            return next(int(l.split()[1]) for l in lines if l.startswith(field)) * 1024
""")


def test_never_builds_n_by_n_matrix():
    """60,000 patches: an N x N float matrix would be 14.4 GB; peak RSS must grow far less."""
    script = MEMORY + textwrap.dedent("""
        import torch
        from models.coreset import ApproximateGreedyCoreset
        features = torch.randn(60000, 1024)
        before = status("VmRSS:")
        ApproximateGreedyCoreset(0.002, progress=False).run(features)
        print((status("VmHWM:") - before) // 2**20)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    grown_mb = int(out.stdout.strip().splitlines()[-1])
    assert grown_mb < 500, f"coreset grew peak memory by {grown_mb} MB"


@pytest.mark.parametrize("order, precision", [("candidates", "fp32"), ("eager", "fp32"),
                                              (None, "fp16")])
def test_working_bytes_is_what_a_run_adds_to_peak_memory(order, precision):
    """--dry-run's coreset memory: the growth of peak RSS over 100,000 patches, per order. The
    candidates order's count is an upper bound (its update blocks are rarely as large as allowed)."""
    script = MEMORY + textwrap.dedent(f"""
        import torch
        from models.coreset import ApproximateGreedyCoreset
        features = torch.randn(100_000, 256)
        sampler = ApproximateGreedyCoreset(0.002, progress=False, order={order!r},
                                           precision={precision!r})
        sampler.run(torch.randn(2000, 256))  # the thread pools' own memory, before measuring
        before = status("VmRSS:")
        sampler.run(features)
        print(status("VmHWM:") - before, sampler.working_bytes(len(features), "cpu"))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    grown, counted = (int(v) for v in out.stdout.split())
    # (the candidates order's update blocks here hold ~4,000 patches, its bound 65,536)
    assert (0.5 if order == "candidates" else 0.85) * counted <= grown <= 1.15 * counted, \
        (grown, counted)


def test_fast_orders_pick_the_same_patches_as_the_reference_algorithm(monkeypatch):
    """The eager loop and the candidates order (upper bounds) must be Algorithm 1 as
    ``reference_greedy_coreset`` writes it, not approximations of it: same picks in the same
    order, with features wider than the projection, and candidate sets so small that they are
    chosen afresh every few picks (8) or large enough to last (the default)."""
    import models.coreset as coreset
    for seed, dim, n_candidates in ((0, 64, 8), (2, 64, coreset.CANDIDATES), (5, 200, 8)):
        monkeypatch.setattr(coreset, "CANDIDATES", n_candidates)
        features = clustered(n=2501, dim=dim, seed=seed)
        reference = reference_greedy_coreset(features, 0.03, seed=seed)
        eager = ApproximateGreedyCoreset(0.03, seed=seed, progress=False, order="eager")
        candidates = ApproximateGreedyCoreset(0.03, seed=seed, progress=False,
                                              order="candidates")
        assert len(reference) == 75
        assert torch.equal(eager.run(features), reference), f"seed {seed}"
        assert torch.equal(candidates.run(features), reference), f"seed {seed}"
        if n_candidates == 8:
            # Fresh candidates were chosen many times, yet bringing bounds up to date did a
            # fraction of the eager loop's N x picks products: most patches never met most picks.
            assert candidates.updates > 2
            assert candidates.updated_products < 0.5 * 2501 * 75


def test_candidates_in_runs_drop_the_picks_after_an_invalid_one(monkeypatch):
    """On CUDA candidate picks run in graphs of ``graph_steps``; a pick made after the candidates
    went stale must be dropped and redone. Runs of 16 without a graph take the same path here."""
    import models.coreset as coreset
    monkeypatch.setattr(coreset, "CANDIDATES", 8)
    features = clustered(n=2501, dim=64, seed=3)
    reference = reference_greedy_coreset(features, 0.05, seed=3)
    runs = ApproximateGreedyCoreset(0.05, seed=3, progress=False, order="candidates",
                                    graph_steps=16)
    assert torch.equal(runs.run(features), reference)
    assert runs.updates > 2


def test_float16_greedy_with_recheck_picks_what_the_float32_reference_picks(monkeypatch):
    """The float16 pass alone lets rounding decide picks; the float32 re-check of the top
    candidates must restore the reference's picks, in order. The last case is hard enough that
    re-checking only the chosen point is not: the re-check width is what makes it exact."""
    import models.coreset as coreset
    for seed, dim, n, fraction in ((0, 64, 2501, 0.03), (5, 200, 2501, 0.03),
                                   (1, 1024, 20000, 0.02)):
        features = clustered(n=n, dim=dim, seed=seed)
        reference = reference_greedy_coreset(features, fraction, seed=seed)
        half = ApproximateGreedyCoreset(fraction, seed=seed, progress=False,
                                        precision="fp16").run(features)
        assert torch.equal(half, reference), f"seed {seed}"
    monkeypatch.setattr(coreset, "RECHECK_CANDIDATES", 1)
    narrow = ApproximateGreedyCoreset(fraction, seed=seed, progress=False,
                                      precision="fp16").run(features)
    assert not torch.equal(narrow, reference)


@pytest.mark.parametrize("order,precision", [("candidates", "fp32"), ("eager", "fp32"),
                                             ("eager", "fp16")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_features_holding_nan_or_inf_are_refused_not_searched_forever(order, precision, value):
    """A NaN never compares larger: the candidates order waited forever for its bounds to settle."""
    from utils.errors import UserError

    features = clustered(n=2000, dim=64)
    features[1234, 5] = value
    with interrupted_after(60), pytest.raises(
            UserError, match="^the patch features to subsample hold NaN or infinite values: "):
        ApproximateGreedyCoreset(0.1, progress=False, order=order,
                                 precision=precision).run(features)


def test_coreset_precision_is_a_patchcore_setting_and_bad_values_are_refused():
    from models.patchcore import PatchCore
    assert any(s.name == "coreset_precision" and s.flag == "--coreset-precision"
               for s in PatchCore.settings)
    assert PatchCore.defaults()["coreset_precision"] == "fp32"  # the paper's, by default
    with pytest.raises(ValueError, match="fp32, fp16"):
        ApproximateGreedyCoreset(0.1, precision="bf16")
    with pytest.raises(ValueError, match="eager, candidates"):
        ApproximateGreedyCoreset(0.1, order="lazy")


def test_fp16_with_the_candidates_order_is_one_line_naming_both_flags(tmp_path, synthetic_root,
                                                                      resnet18_weights, capsys):
    import main
    code = main.main(["--coreset-precision", "fp16", "--coreset-order", "candidates",
                      "--backbone", "resnet18", "--weights", str(resnet18_weights),
                      "--data-root", str(synthetic_root), "--custom", "--categories", "cubes",
                      "--resize", "64", "--crop", "64", "--plots", "0", "--no-progress",
                      "--result-dir", str(tmp_path / "r")])
    error = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert error[-1].startswith("error: --coreset-order candidates has no --coreset-precision")
    assert not any("Traceback" in line for line in error)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (graph replay)")
@pytest.mark.parametrize("options", [{}, {"precision": "fp16"}, {"order": "candidates"}],
                         ids=["eager", "eager-fp16", "candidates"])
def test_cuda_graph_replay_picks_what_step_by_step_launches_and_the_reference_pick(options,
                                                                                   monkeypatch):
    """A captured graph must re-run the same iterations: the same picks as launching each step,
    and as the CPU reference, including a remainder that does not fill a whole graph. The float16
    pick keeps its centres in a block indexed by a device-side counter; the candidates order is
    run with 8 candidates, so that they are chosen afresh inside graphs."""
    import models.coreset as coreset
    monkeypatch.setattr(coreset, "CANDIDATES", 8)
    features = clustered(n=20011, dim=96, seed=7)
    graph = ApproximateGreedyCoreset(0.021, progress=False, graph_steps=64,
                                     **options).run(features.cuda())
    steps = ApproximateGreedyCoreset(0.021, progress=False, graph_steps=0,
                                     **options).run(features.cuda())
    assert len(graph) == 420 and len(set(graph.tolist())) == 420
    assert torch.equal(graph.cpu(), steps.cpu())
    assert torch.equal(graph.cpu(), reference_greedy_coreset(features, 0.021))
