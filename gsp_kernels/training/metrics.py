"""Retrieval metrics as the metric-learning papers report them.

- ``retrieval_metrics(query_embeddings, query_labels, reference_embeddings=None,
  reference_labels=None, recall_ks=(1, 2, 4, 8)) -> dict``: keys ``"recall@K"`` for each K,
  ``"map@r"`` and ``"r_precision"``. Cosine similarity; pytorch-metric-learning's
  AccuracyCalculator, extended with Recall@K. Without a reference set every query is searched
  against all the others (CUB, Cars196, SOP); with one, query against gallery (In-Shop).
- ``separated_metrics(per_model) -> dict``: the mean of each metric over several models.

Recall@K is the fraction of queries with at least one same-class item among their K nearest
references. When K exceeds the references a query can retrieve (all of them, less the query
itself when searching all against all), all of them count, so that Recall@K is 1.
As in AccuracyCalculator, queries whose class has no other item in the reference set are left
out of every metric; with no query left, ValueError.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

METRIC_NAMES = {"map@r": "mean_average_precision_at_r", "r_precision": "r_precision"}  # ours -> AccuracyCalculator's


def _recall_calculator_class():
    """AccuracyCalculator with ``recall_at_<K>`` metrics, through its extension mechanism:
    ``calculate_<name>`` methods (here one per K, set before its __init__ collects them) and
    ``requires_knn``."""
    from pytorch_metric_learning.utils import accuracy_calculator as pml_accuracy

    class RecallAtKCalculator(pml_accuracy.AccuracyCalculator):
        def __init__(self, recall_ks: tuple[int, ...], **kwargs):
            self.recall_ks = recall_ks
            for k in recall_ks:
                setattr(self, f"calculate_recall_at_{k}", partial(self._recall_at, k))
            super().__init__(**kwargs)

        def requires_knn(self):
            return super().requires_knn() + [f"recall_at_{k}" for k in self.recall_ks]

        def _recall_at(self, k, knn_labels, query_labels, not_lone_query_mask, label_counts, **kwargs):
            knn_labels, query_labels = pml_accuracy.try_getting_not_lone_labels(
                knn_labels, query_labels, not_lone_query_mask)
            if knn_labels is None:
                return pml_accuracy.nan_accuracy(label_counts[0], self.return_per_class)
            hit = (knn_labels[:, :k] == query_labels[:, None]).any(dim=1).double()  # [queries]
            return pml_accuracy.maybe_get_avg_of_avgs(hit, query_labels, self.avg_of_avgs, self.return_per_class)

    return RecallAtKCalculator


def _check_pair(embeddings, labels, what: str) -> tuple[Tensor, Tensor]:
    embeddings, labels = torch.as_tensor(embeddings), torch.as_tensor(labels)
    if embeddings.ndim != 2 or labels.ndim != 1 or len(embeddings) != len(labels):
        raise ValueError(f"{what}: need embeddings [n, E] and labels [n], "
                         f"got {tuple(embeddings.shape)} and {tuple(labels.shape)}")
    if len(labels) == 0:
        raise ValueError(f"{what}: no samples")
    if not torch.isfinite(embeddings).all():
        raise ValueError(f"{what}: embeddings hold NaN or inf")
    return embeddings.float(), labels.long()


def retrieval_metrics(query_embeddings: Tensor, query_labels: Tensor, reference_embeddings: Tensor | None = None,
                      reference_labels: Tensor | None = None, recall_ks=(1, 2, 4, 8), device=None) -> dict[str, float]:
    """Recall@K for each of ``recall_ks``, MAP@R and R-Precision of ``query_embeddings`` ``[q, E]``
    against ``reference_embeddings`` ``[r, E]`` by cosine similarity, or against the other
    queries when no reference is given. ``device``: where the neighbours are searched
    (AccuracyCalculator's default: CUDA when available)."""
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.inference import CustomKNN

    recall_ks = tuple(int(k) for k in recall_ks)
    if not recall_ks or min(recall_ks) < 1 or len(set(recall_ks)) != len(recall_ks):
        raise ValueError(f"recall_ks must be distinct positive integers, got {recall_ks}")
    if (reference_embeddings is None) != (reference_labels is None):
        raise ValueError("give both reference_embeddings and reference_labels, or neither")
    query, query_labels = _check_pair(query_embeddings, query_labels, "query")
    all_against_all = reference_embeddings is None
    if all_against_all:
        reference, reference_labels = query, query_labels
    else:
        reference, reference_labels = _check_pair(reference_embeddings, reference_labels, "reference")
        if reference.shape[1] != query.shape[1]:
            raise ValueError(f"query and reference embeddings differ in size: {query.shape[1]} and {reference.shape[1]}")
    retrievable = len(reference) - int(all_against_all)  # references each query ranks
    if retrievable < 1:
        raise ValueError("searching all against all needs at least 2 samples")
    # Neighbours to search: the largest K (capped at what a query can retrieve), and at least
    # the largest class count R for MAP@R ("max_bin_count", which leaves out the query itself).
    ref_classes, ref_counts = torch.unique(reference_labels, return_counts=True)
    query_class_counts = ref_counts[torch.isin(ref_classes, query_labels)]
    max_bin_count = int(query_class_counts.max()) if len(query_class_counts) else 0
    if max_bin_count <= int(all_against_all):
        raise ValueError(f"no query has a same-class item to retrieve: every metric would be NaN "
                         f"({len(torch.unique(query_labels))} query classes, {len(ref_classes)} reference classes, "
                         f"{int(ref_counts.max())} items at most in one)")
    recall_depth = min(max(recall_ks), retrievable)
    k = recall_depth if recall_depth > max_bin_count - int(all_against_all) else "max_bin_count"
    calculator = _recall_calculator_class()(
        recall_ks,
        include=(*METRIC_NAMES.values(), *(f"recall_at_{k_}" for k_ in recall_ks)),
        k=k,
        knn_func=CustomKNN(CosineSimilarity(), batch_size=4096),
        device=device,
    )
    if all_against_all:
        scores = calculator.get_accuracy(query, query_labels)
    else:
        scores = calculator.get_accuracy(query, query_labels, reference, reference_labels, ref_includes_query=False)
    metrics = {f"recall@{k_}": float(scores[f"recall_at_{k_}"]) for k_ in recall_ks}
    metrics.update({ours: float(scores[theirs]) for ours, theirs in METRIC_NAMES.items()})
    return metrics


def separated_metrics(per_model: list[dict]) -> dict:
    """The mean of each metric over the models evaluated one by one (MLRC's "separated")."""
    return {name: sum(metrics[name] for metrics in per_model) / len(per_model) for name in per_model[0]}
