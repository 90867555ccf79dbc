"""Retrieval metrics against cases worked out by hand (all against all, and query against
gallery as In-Shop is evaluated) and against a brute-force NumPy oracle on random data."""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("pytorch_metric_learning")

from gsp_kernels.training.metrics import retrieval_metrics
from gsp_kernels.training.report import format_metrics_table


def on_circle(degrees):
    """Unit vectors ``[n, 2]`` at these angles: cosine similarity ranks by angular distance."""
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1).float()


# All against all. A at 0, 10, 35 degrees; B at 22, 90, 100. Rankings (nearest first, self left out):
#   a0: a1 b0 a2 b1 b2  R=2: AP@R = 1/2,     R-Prec 1/2, first hit at 1
#   a1: a0 b0 a2 b1 b2       AP@R = 1/2,     R-Prec 1/2, first hit at 1
#   b0: a1 a2 a0 b1 b2       AP@R = 0,       R-Prec 0,   first hit at 4
#   a2: b0 a1 a0 b1 b2       AP@R = (1/2)/2, R-Prec 1/2, first hit at 2
#   b1: b2 a2 b0 a1 a0       AP@R = 1/2,     R-Prec 1/2, first hit at 1
#   b2: b1 a2 b0 a1 a0       AP@R = 1/2,     R-Prec 1/2, first hit at 1
ALL_ANGLES = [0, 10, 22, 35, 90, 100]
ALL_LABELS = [0, 0, 1, 0, 1, 1]
ALL_EXPECTED = {"recall@1": 4 / 6, "recall@2": 5 / 6, "recall@3": 5 / 6, "recall@4": 1.0, "recall@8": 1.0,
                "map@r": 2.25 / 6, "r_precision": 2.5 / 6}

# Query against gallery. Queries q0 (A) at 0 and q1 (B) at 50; gallery g0 B 10, g1 A 20, g2 B 45, g3 A 60, g4 B 100.
#   q0: g0 g1 g2 g3 g4 = B A B A B, R=2: AP@R = (1/2)/2, R-Prec 1/2, first hit at 2
#   q1: g2 g3 g1 g0 g4 = B A A B B, R=3: AP@R = 1/3,     R-Prec 1/3, first hit at 1
QUERY_ANGLES, QUERY_LABELS = [0, 50], [0, 1]
GALLERY_ANGLES, GALLERY_LABELS = [10, 20, 45, 60, 100], [1, 0, 1, 0, 1]
GALLERY_EXPECTED = {"recall@1": 1 / 2, "recall@2": 1.0, "recall@10": 1.0, "map@r": (1 / 4 + 1 / 3) / 2,
                    "r_precision": (1 / 2 + 1 / 3) / 2}


def assert_metrics(got, expected):
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_all_against_all_by_hand():
    ks = (1, 2, 3, 4, 8)  # 8 is more than the 5 others: capped, so every query hits
    assert_metrics(retrieval_metrics(on_circle(ALL_ANGLES), torch.tensor(ALL_LABELS), recall_ks=ks), ALL_EXPECTED)


def test_lone_queries_are_left_out():
    # a class C with one item at 210 degrees: it has nothing to retrieve, and is last in every ranking
    ks = (1, 2, 3, 4, 8)
    got = retrieval_metrics(on_circle(ALL_ANGLES + [210]), torch.tensor(ALL_LABELS + [2]), recall_ks=ks)
    assert_metrics(got, ALL_EXPECTED)


def test_query_against_gallery_by_hand():
    got = retrieval_metrics(on_circle(QUERY_ANGLES), torch.tensor(QUERY_LABELS), on_circle(GALLERY_ANGLES),
                            torch.tensor(GALLERY_LABELS), recall_ks=(1, 2, 10))
    assert_metrics(got, GALLERY_EXPECTED)


def test_gallery_copy_of_a_query_is_not_left_out():
    # a gallery item equal to q0, of q0's class: with a separate gallery it is q0's first hit
    got = retrieval_metrics(on_circle(QUERY_ANGLES), torch.tensor(QUERY_LABELS), on_circle(GALLERY_ANGLES + [0]),
                            torch.tensor(GALLERY_LABELS + [0]), recall_ks=(1,))
    # q0: A(copy) B A B A B, R=3: AP@R = (1 + 2/3)/3, R-Prec 2/3; q1 as before
    assert got["recall@1"] == pytest.approx(1.0)
    assert got["map@r"] == pytest.approx(((1 + 2 / 3) / 3 + 1 / 3) / 2)
    assert got["r_precision"] == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_scale_does_not_matter_cosine():
    scales = torch.tensor([0.1, 5.0, 2.0, 30.0, 1.0, 0.7])[:, None]
    got = retrieval_metrics(on_circle(ALL_ANGLES) * scales, torch.tensor(ALL_LABELS), recall_ks=(1, 2, 3, 4, 8))
    assert_metrics(got, ALL_EXPECTED)


def oracle(query, query_labels, reference, reference_labels, ks, all_against_all):
    """Brute force in NumPy float64: rank every reference by cosine similarity per query."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    r = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    similarity = q @ r.T
    recalls = {k: [] for k in ks}
    aps, rps = [], []
    for i in range(len(q)):
        order = np.argsort(-similarity[i], kind="stable")
        if all_against_all:
            order = order[order != i]
        relevant = reference_labels[order] == query_labels[i]
        total = relevant.sum()
        if total == 0:
            continue
        for k in ks:
            recalls[k].append(relevant[:k].any())
        top = relevant[:total]
        aps.append(sum(top[j] * top[: j + 1].sum() / (j + 1) for j in range(total)) / total)
        rps.append(top.mean())
    out = {f"recall@{k}": float(np.mean(recalls[k])) for k in ks}
    out.update({"map@r": float(np.mean(aps)), "r_precision": float(np.mean(rps))})
    return out


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("all_against_all", [True, False])
def test_random_embeddings_match_a_brute_force_oracle(seed, all_against_all):
    rng = np.random.default_rng(seed)
    ks = (1, 3, 10, 100)
    query = rng.normal(size=(37, 5))
    query_labels = rng.integers(0, 7, 37)
    if all_against_all:
        reference, reference_labels = query, query_labels
        got = retrieval_metrics(torch.from_numpy(query), torch.from_numpy(query_labels), recall_ks=ks)
    else:
        reference, reference_labels = rng.normal(size=(53, 5)), rng.integers(0, 8, 53)
        got = retrieval_metrics(torch.from_numpy(query), torch.from_numpy(query_labels), torch.from_numpy(reference),
                                torch.from_numpy(reference_labels), recall_ks=ks)
    expected = oracle(query, query_labels, reference, reference_labels, ks, all_against_all)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_recall_at_1_is_precision_at_1():
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    embeddings, labels = torch.randn(40, 6, generator=torch.Generator().manual_seed(3)), torch.arange(40) % 5
    theirs = AccuracyCalculator(include=("precision_at_1",), k=1, knn_func=CustomKNN(CosineSimilarity()),
                                device=torch.device("cpu")).get_accuracy(embeddings, labels)
    assert retrieval_metrics(embeddings, labels, recall_ks=(1,))["recall@1"] == pytest.approx(theirs["precision_at_1"])


def test_bad_input():
    embeddings, labels = on_circle(ALL_ANGLES), torch.tensor(ALL_LABELS)
    with pytest.raises(ValueError, match="labels"):
        retrieval_metrics(embeddings, labels[:-1])
    with pytest.raises(ValueError, match="both"):
        retrieval_metrics(embeddings, labels, reference_embeddings=embeddings)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(embeddings * float("nan"), labels)
    with pytest.raises(ValueError, match="recall_ks"):
        retrieval_metrics(embeddings, labels, recall_ks=(0, 1))
    with pytest.raises(ValueError, match="differ in size"):
        retrieval_metrics(embeddings, labels, torch.ones(3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="at least 2"):
        retrieval_metrics(embeddings[:1], labels[:1])
    with pytest.raises(ValueError, match="no query has a same-class item"):
        retrieval_metrics(embeddings, torch.arange(6))  # every class a singleton
    with pytest.raises(ValueError, match="no query has a same-class item"):
        retrieval_metrics(embeddings[:2], torch.tensor([7, 8]), embeddings, labels)


def test_format_metrics_table():
    single = format_metrics_table(ALL_EXPECTED)
    header, values = single.splitlines()[:2]
    assert header.split() == list(ALL_EXPECTED)
    assert values.split() == ["66.67", "83.33", "83.33", "100.00", "100.00", "37.50", "41.67"]
    rows = format_metrics_table({"gsp": GALLERY_EXPECTED, "gap": {**GALLERY_EXPECTED, "recall@1": 0.25}}).splitlines()
    assert rows[1].split()[:2] == ["gsp", "50.00"] and rows[2].split()[:2] == ["gap", "25.00"]
    with pytest.raises(ValueError, match="lacks"):
        format_metrics_table({"gsp": GALLERY_EXPECTED, "gap": {"recall@1": 0.5}})
