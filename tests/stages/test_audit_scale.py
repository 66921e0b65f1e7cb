"""Audit at scale: the approximate near-duplicate search (faiss HNSW graphs, memory-mapped float16 embeddings
and uint8 thumbnails; what runs above checks.ANN_ABOVE images) finds what comparing all pairs finds on
planted data, and its memory does not grow with all the thumbnails or embeddings as float32.

Random data with planted copies; `ann_above=0` forces the approximate path on a few hundred images.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from helpers import mapped_bytes

from pipeline.config import AuditParams
from pipeline.stages.audit import checks

_CLUMP = 40  # near-identical embeddings: each has more alike others than the graph returns at first


def _planted(n: int, channels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, set[tuple[int, int]]]:
    """Random embeddings and 48 px thumbnails with copies planted: embeddings alike enough on their own, a
    noisy embedding whose pixels are the same, a mirrored thumbnail under another embedding, and a clump of
    near-identical embeddings; returns the pairs that must share a group."""
    rng = np.random.default_rng(seed)
    embeddings = rng.standard_normal((n, channels)).astype(np.float32)
    thumbs = rng.integers(0, 256, size=(n, 48, 48), dtype=np.uint8)
    planted = set()
    for source in range(0, n - _CLUMP - 10, 10):
        kind = (source // 10) % 3
        if kind == 0:  # cosine about 0.99
            embeddings[source + 1] = embeddings[source] + 0.15 * rng.standard_normal(channels)
        elif kind == 1:  # cosine about 0.7, the same pixels brightened
            embeddings[source + 1] = embeddings[source] + rng.standard_normal(channels)
            thumbs[source + 1] = np.clip(thumbs[source].astype(np.int16) + 9, 0, 255)
        else:  # an unrelated embedding, the picture mirrored
            thumbs[source + 1] = thumbs[source][:, ::-1]
        planted.add((source, source + 1))
    clump = np.arange(n - _CLUMP, n)
    embeddings[clump] = embeddings[clump[0]] + 0.05 * rng.standard_normal((_CLUMP, channels))
    planted |= {(int(i), int(j)) for i in clump for j in clump if i < j}
    return embeddings, thumbs, planted


def _tuples(pairs: checks.Pairs) -> set[tuple[int, int]]:
    return set(zip(pairs.first.tolist(), pairs.second.tolist(), strict=True))


@pytest.mark.parametrize("channels", [96, 1280], ids=["no-projection", "principal-axes"])
def test_the_approximate_search_finds_the_same_pairs_and_groups_as_comparing_all_pairs(channels):
    embeddings, thumbs, planted = _planted(200, channels)
    audit = AuditParams(neighbours=2)
    exact = checks.near_duplicates(embeddings, thumbs, audit, ann_above=10**9)
    approximate = checks.near_duplicates(embeddings, thumbs, audit, ann_above=0)
    assert planted <= _tuples(exact)  # the data is what it says
    assert _tuples(approximate) == _tuples(exact)  # the clump's 780 pairs too: asked again for more
    assert np.allclose(approximate.similarity, exact.similarity, atol=2e-3)  # float16 embeddings
    assert np.array_equal(approximate.correlation, exact.correlation, equal_nan=True)
    keys = [f"{k:04d}" for k in range(len(embeddings))]
    assert checks.group_ids(keys, approximate) == checks.group_ids(keys, exact)


def test_a_clump_larger_than_the_alike_cap_stays_one_group_without_all_its_pairs(monkeypatch):
    """Every image of a clump of 150 is alike to the 149 others: with at most 32 asked for per image the
    search stops there (11,175 pairs would grow as the clump squared), and the chained group is whole."""
    rng = np.random.default_rng(5)
    embeddings = rng.standard_normal((400, 96)).astype(np.float32)
    embeddings[250:] = embeddings[250] + 0.05 * rng.standard_normal((150, 96))
    monkeypatch.setattr(checks, "_ALIKE_MOST", 32)
    asked = []
    real = checks._reranked

    def reranked(index, unit, ids, queries, projected, wanted):
        asked.append(wanted)
        return real(index, unit, ids, queries, projected, wanted)

    monkeypatch.setattr(checks, "_reranked", reranked)

    alike, _ = checks.similar_pairs(embeddings, 0.9, 2, ann_above=0)

    assert max(asked) == 32 and len(alike) <= 150 * 32
    keys = [f"{k:04d}" for k in range(400)]
    groups = checks.group_ids(keys, alike)
    assert len({groups[k] for k in range(250, 400)}) == 1 and len(set(groups[:250])) == 250


def test_the_approximate_pixel_search_finds_each_images_mirrored_copy():
    _, thumbs, _ = _planted(400, 8)
    mirrored = {(k, k + 1) for k in range(20, 350, 30)}  # the third kind of planted copy
    exact, approximate = (_tuples(checks.pixel_nearest(thumbs, above)) for above in (10**9, 0))
    assert mirrored <= exact and mirrored <= approximate
    assert len(approximate & exact) >= 0.9 * len(exact)  # random pixels: no structure for the graph to use


def _peak_bytes(n: int, tmp_path: Path, channels: int = 1280) -> int:
    """Peak bytes numpy allocates while the approximate candidate search runs on n images read from
    memory-mapped files (the mapped pages themselves are not allocations)."""
    embeddings, thumbs, _ = _planted(n, channels)
    files = [tmp_path / f"{name}-{n}.npy" for name in ("embeddings", "thumbs")]
    np.save(files[0], embeddings.astype(np.float16))
    np.save(files[1], thumbs)
    del embeddings, thumbs
    embeddings, thumbs = (np.load(path, mmap_mode="r") for path in files)
    tracemalloc.start()
    try:
        unit = checks.unit_embeddings(embeddings, tmp_path)
        alike, candidates = checks.candidate_pairs(unit, thumbs, AuditParams(), ann_above=0)
        checks.verified(unit, thumbs, alike, candidates.where(np.arange(len(candidates)) < 50), 0.995)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _correlation_by_pil(first: np.ndarray, second: np.ndarray) -> float:
    """aligned_correlation of one pair, the slow plain way: PIL enlarges `first` (float) by each zoom, every
    window is compared with `second` and its mirror image by np.corrcoef; the best, both ways round."""
    from PIL import Image

    best = -1.0
    for big_one, small_one in ((first, second), (second, first)):
        size = big_one.shape[0]
        for zoom in checks._ZOOMS:
            side = round(size * zoom)
            big = np.asarray(Image.fromarray(big_one).resize((side, side), Image.Resampling.BILINEAR))
            for dy in range(side - size + 1):
                for dx in range(side - size + 1):
                    window = big[dy : dy + size, dx : dx + size].ravel()
                    for template in (small_one, small_one[:, ::-1]):
                        best = max(best, float(np.corrcoef(window, template.ravel())[0, 1]))
    return best


@pytest.mark.parametrize("halved", [True, False])
def test_the_batched_pixel_check_gives_each_pair_the_plain_computations_score(halved, monkeypatch):
    rng = np.random.default_rng(3)
    thumbs = rng.integers(0, 256, size=(30, 48, 48)).astype(np.uint8)
    thumbs[5] = np.clip(thumbs[4].astype(int) + 9, 0, 255)  # brighter copy
    thumbs[7] = thumbs[6][:, ::-1]  # mirror image
    pairs = [(4, 5), (7, 6), *((0, k) for k in range(8, 30)), (1, 2), (3, 9), (2, 1), (10, 11)]  # 0: a hub
    monkeypatch.setattr(checks, "_PIXEL_TASK_BYTES", 2**20)  # tasks of a few thumbnails each

    scores = checks.aligned_correlation(thumbs, pairs, halved=halved)

    def grey(k: int) -> np.ndarray:
        thumb = thumbs[k].astype(np.float32)
        return thumb.reshape(24, 2, 24, 2).mean(axis=(1, 3)) if halved else thumb

    expected = [_correlation_by_pil(grey(a), grey(b)) for a, b in pairs[:6] + pairs[-4:]]
    np.testing.assert_allclose(scores[:6].tolist() + scores[-4:].tolist(), expected, atol=1e-4)
    assert scores[0] > 0.999 and scores[1] > 0.999 and scores[2:].max() < 0.5


def test_the_approximate_search_never_holds_all_thumbnails_or_embeddings_as_float32(tmp_path, monkeypatch):
    # Small fixed buffers, so that what grows with the number of images stands out at a test's size.
    monkeypatch.setattr(checks, "_BLOCK", 256)
    monkeypatch.setattr(checks, "_ANN_BLOCK", 64)
    monkeypatch.setattr(checks, "_ANN_SAMPLE", 500)
    small, large = 1000, 4000
    _peak_bytes(200, tmp_path)  # imports (scipy.linalg, faiss) allocate too: once, before measuring
    growth = -_peak_bytes(small, tmp_path) + _peak_bytes(large, tmp_path)
    added = large - small  # as float32, their thumbnails are 28 MB, their embeddings 15 MB
    assert growth < 0.25 * added * 1280 * 4, f"{growth / 2**20:.1f} MiB"


def _noisy_classes(n: int, classes: int, channels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes (unit noise around random centres) with 5% of the labels changed: continuous
    probabilities, so no two images tie."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = 1.5 * rng.standard_normal((classes, channels))
    embeddings = (centres[labels] + rng.standard_normal((n, channels))).astype(np.float32)
    flipped = rng.choice(n, n // 20, replace=False)
    labels[flipped] = (labels[flipped] + rng.integers(1, classes, len(flipped))) % classes
    return embeddings, labels


def test_memory_mapped_passes_leave_no_file_pages_in_the_rss(tmp_path):
    """unit_embeddings reads the features and writes the unit rows through memory maps a block at a time; the
    pages each block touched are released (shards.release), so the process does not end up mapping both
    files whole (at a million images: 5 GB of RSS)."""
    source = tmp_path / "features.npy"
    features = np.lib.format.open_memmap(source, mode="w+", dtype=np.float16, shape=(20_000, 512))
    features[:] = np.random.default_rng(0).standard_normal((20_000, 512))
    del features
    features = np.load(source, mmap_mode="r")  # 20 MB, as the feature store hands it over

    unit = checks.unit_embeddings(features, tmp_path)

    assert mapped_bytes(source) < 4 * 2**20 and mapped_bytes(tmp_path / "unit.npy") < 4 * 2**20
    expected = checks.unit_embeddings(np.asarray(features, dtype=np.float32))
    np.testing.assert_allclose(np.asarray(unit, dtype=np.float32), expected, atol=2e-3)


def test_scattered_rows_are_read_a_few_at_a_time_so_few_file_pages_are_ever_mapped(tmp_path, monkeypatch):
    """The kernel maps a whole page-cache folio (up to 2 MB) around each row a read faults in: 20,000 random
    rows of a million unit embeddings, read at once to fit the principal axes, mapped 2.5 GB, and 1,024 at a
    time 1.36 GB (the audit's peak RSS at a million images). Read _GATHER_ROWS at a time and released after
    each, a few rows' worth is ever mapped."""
    source = tmp_path / "unit.npy"
    unit = np.lib.format.open_memmap(source, mode="w+", dtype=np.float16, shape=(200_000, 256))  # 100 MB
    unit[:] = np.random.default_rng(0).standard_normal(unit.shape)
    del unit
    unit = np.load(source, mmap_mode="r")
    rows = np.sort(np.random.default_rng(1).choice(len(unit), 20_000, replace=False))
    mapped, release = [], checks.release

    def measured(*arrays):  # the file's resident pages just before each release
        mapped.append(mapped_bytes(source))
        release(*arrays)

    monkeypatch.setattr(checks, "release", measured)
    read = checks.read_rows(unit, rows)
    assert len(mapped) == -(-20_000 // checks._GATHER_ROWS)
    assert max(mapped) < 16 * 2**20, max(mapped) / 2**20  # at once: most of the 100 MB file
    np.testing.assert_array_equal(read, np.asarray(unit[rows], dtype=np.float32))


_GRAPH_PEAK = """
import re, numpy as np
from pipeline.stages.audit import checks

def status(field):  # KiB; VmHWM is this process's own peak (ru_maxrss keeps the parent's over exec)
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

checks._HNSW_BUILD = 8  # a quick build: the memory is the graph's links and vectors either way
n = 140_000  # just past 2**17: a doubling vector has just been copied
rows = np.random.default_rng(0).standard_normal((n, 8), dtype=np.float32)
before = status("VmRSS")
index = checks._graph((rows[a : a + 1024] for a in range(0, n, 1024)), 32, n, "test")
print((status("VmHWM") - before) / 1024, (status("VmRSS") - before) / 1024, index.ntotal)
"""


def test_the_graph_is_built_in_room_made_for_it_so_its_memory_never_doubles():
    """faiss grows an HNSW graph's vectors by doubling as blocks arrive: a million images' graph briefly held
    up to three times its size (+1.2 GB at the audit's peak). With its room made first (checks._reserve), the
    build's peak is the graph's own size (without it here: 70 MiB against 60)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _GRAPH_PEAK], capture_output=True, text=True, check=True)
    peak, final, rows = (float(v) for v in done.stdout.split())
    assert rows == 140_000
    assert peak <= 1.03 * final + 1, (peak, final)


@pytest.mark.parametrize("source", ["logistic", "discriminant"])
def test_label_issues_read_a_block_at_a_time_are_cleanlabs_own(source, monkeypatch):
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    embeddings, labels = _noisy_classes(9000, 12, 16)  # more rows than one block
    if source == "logistic":
        probabilities = checks.out_of_fold_probabilities(embeddings, labels, 3, seed=0)
    else:
        probabilities = checks.discriminant_probabilities(embeddings, labels, 3, seed=0).astype(np.float64)
    expected = find_label_issues(
        labels, probabilities, filter_by="low_self_confidence", return_indices_ranked_by="self_confidence"
    )
    monkeypatch.setattr(checks, "_PROBE_BLOCK", 1000)
    found = checks.label_issues(labels, probabilities)
    assert 150 < len(expected) < 900  # the data has issues to find (450 labels changed)
    assert np.array_equal(found.ranked, expected)
    assert np.allclose(
        found.quality, get_label_quality_scores(labels, probabilities, method="self_confidence")
    )
    assert np.array_equal(found.suggested, probabilities.argmax(axis=1))


def test_the_discriminant_is_sklearns_fitted_on_the_other_folds_then_tempered():
    from scipy.special import log_softmax
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    embeddings, labels = _noisy_classes(3000, 5, 8, seed=1)
    probabilities = checks.discriminant_probabilities(embeddings, labels, 4, seed=3, shrinkage=0.0)
    folds = checks.fold_of(labels, 4, seed=3)
    assert np.bincount(folds).min() >= 700  # four folds, all used
    logits = np.empty_like(probabilities, dtype=np.float64)
    for k in range(4):
        held = folds == k
        model = LinearDiscriminantAnalysis(solver="lsqr").fit(embeddings[~held], labels[~held])
        logits[held] = model.decision_function(embeddings[held])
    # one temperature for all folds: log-probability differences are the logits' divided by it
    gaps = np.log(probabilities[:, 1:]) - np.log(probabilities[:, :1])
    temperature = np.median((logits[:, 1:] - logits[:, :1]) / gaps)
    assert 1.2 < temperature < 20  # Gaussian posteriors are overconfident: the fit softens them
    assert np.allclose(probabilities, np.exp(log_softmax(logits / temperature, axis=1)), atol=1e-5)


def test_the_discriminants_memory_does_not_grow_with_the_images(tmp_path, monkeypatch):
    monkeypatch.setattr(checks, "_PROBE_BLOCK", 500)
    peaks, results = [], []
    for n in (20_000, 60_000):
        embeddings, labels = _noisy_classes(n, 100, 32, seed=2)
        source = np.lib.format.open_memmap(
            tmp_path / f"e{n}.npy", mode="w+", dtype=np.float16, shape=embeddings.shape
        )
        source[:] = embeddings
        del embeddings
        folder = tmp_path / str(n)
        folder.mkdir()
        tracemalloc.start()
        mapped = checks.discriminant_probabilities(source, labels, 5, seed=0, folder=folder)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert isinstance(mapped, np.memmap)
        results.append((mapped, labels))
    assert peaks[1] < 1.25 * peaks[0]  # three times the images, the same memory (blocks, a fixed draw)
    mapped, labels = results[1]
    assert (mapped.argmax(axis=1) == labels).mean() > 0.8  # a probe that learnt the classes (5% mislabelled)


def test_the_long_passes_log_their_progress(tmp_path, monkeypatch, caplog):
    import logging

    from pipeline import progress

    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)  # a line at every step, as a long pass writes them
    embeddings, thumbs, _ = _planted(300, 96)
    labels = np.arange(300) % 3
    with caplog.at_level(logging.INFO, logger="pipeline.progress"):
        checks.near_duplicates(embeddings, thumbs, AuditParams(neighbours=2), ann_above=0)
        checks.discriminant_probabilities(embeddings, labels, 3, seed=0)
    logged = " ".join(record.getMessage() for record in caplog.records)
    for desc in ("embedding graph", "embedding neighbours", "pixel graph", "pixel neighbours",
                 "pixel check (half side)", "label probe (probabilities)"):  # fmt: skip
        assert f"audit {desc}" in logged


def test_above_probe_above_the_label_probe_is_the_discriminant_in_a_file(tmp_path, monkeypatch):
    embeddings, labels = _noisy_classes(600, 4, 8, seed=4)
    small = checks.out_of_fold_probabilities(embeddings, labels, 3, seed=0, folder=tmp_path)
    assert not isinstance(small, np.memmap)  # the logistic regression, in memory
    monkeypatch.setattr(checks, "PROBE_ABOVE", 500)
    large = checks.out_of_fold_probabilities(embeddings, labels, 3, seed=0, folder=tmp_path)
    assert isinstance(large, np.memmap)
    assert np.allclose(large, checks.discriminant_probabilities(embeddings, labels, 3, seed=0))
