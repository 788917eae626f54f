"""k-NN classification of frozen features: the weighted vote of Wu et al. (2018) / DINO (cosine, k=20, T=0.07).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..training.progress import tracked


def knn_scores(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    show_progress: bool = False,
) -> torch.Tensor:
    """Class scores `(Q, C)` of a weighted k-NN: each of the k most cosine-similar bank samples votes for its class
    with weight `exp(similarity / temperature)` (Wu et al., 2018; DINO's `knn_classifier`).

    Queries are processed in chunks so the `(chunk, N)` similarity matrix stays small; `show_progress` counts them.
    """
    bank = F.normalize(bank.float(), dim=-1)
    k = min(k, bank.shape[0])
    scores = []
    for start in tracked(range(0, queries.shape[0], chunk_size), "k-NN", unit="chunk", enabled=show_progress):
        query = F.normalize(queries[start : start + chunk_size].float(), dim=-1)
        similarity, index = (query @ bank.T).topk(k, dim=-1)  # (chunk, k)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes, device=query.device, dtype=weights.dtype)
        scores.append(votes.scatter_add_(1, bank_labels[index], weights))
    return torch.cat(scores) if scores else torch.zeros(0, num_classes, device=queries.device)
