"""A small model with exactly low-rank task deltas on separable inputs, shared by the
model-level tests (no transformers needed)."""
import copy

import torch
from torch import nn

T = 3
D_IN, D_HIDDEN, D_OUT = 24, 32, 8


def _orthonormal_rows(rows, cols, g):
    return torch.linalg.qr(torch.randn(cols, rows, generator=g, dtype=torch.float64)).Q.T


def make_experts(seed=0):
    """A base MLP and T fine-tuned copies whose deltas have rank <= the default rank, the
    first layer's on disjoint input subspaces (so inputs of task t are separable)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the same base in every process (the CLI test builds one)
        base = nn.Sequential(nn.Linear(D_IN, D_HIDDEN), nn.Tanh(), nn.Linear(D_HIDDEN, D_OUT))
    r0 = min(D_HIDDEN, D_IN) // T            # 8: default rank of layer 0
    r2 = min(D_OUT, D_HIDDEN) // T           # 2: default rank of layer 2
    basis = _orthonormal_rows(T * r0, D_IN, g)  # disjoint subspaces, one per task
    experts, subspaces = {}, []
    for t in range(T):
        expert = copy.deepcopy(base)
        B = basis[t * r0:(t + 1) * r0]                         # (r0, D_IN)
        A = torch.randn(D_HIDDEN, r0, generator=g, dtype=torch.float64)
        with torch.no_grad():
            expert[0].weight += (A @ B).float()
            expert[2].weight += (torch.randn(D_OUT, r2, generator=g, dtype=torch.float64)
                                 @ torch.randn(r2, D_HIDDEN, generator=g, dtype=torch.float64)
                                 ).float()
        experts[f"task{t}"] = expert
        subspaces.append(B.float())
    return base, experts, subspaces


def task_inputs(subspaces, per_task, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs, labels = [], []
    for t, B in enumerate(subspaces):
        xs.append(torch.randn(per_task, B.shape[0], generator=g) @ B)
        labels += [t] * per_task
    order = torch.randperm(len(labels), generator=g)
    return torch.cat(xs)[order], torch.tensor(labels)[order]
