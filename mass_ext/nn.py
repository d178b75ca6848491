"""RoutedLinear: a drop-in nn.Linear that carries T low-rank task updates and routes
every input row to them (mass_ext.routed_linear), and the factorisation that builds it."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from ._validation import acc_dtype, check_layer_inputs, check_routing_options


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and kin): a linear layer y = x W + b that stores
    W as (d_in, d_out). Recognised by name, so transformers is never imported."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def is_linear(module: nn.Module) -> bool:
    """A layer MASS can route: nn.Linear, or transformers' Conv1D."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def linear_weight(module: nn.Module, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`weight` (default: the module's own) as nn.Linear's (d_out, d_in)."""
    weight = module.weight if weight is None else weight
    return weight.transpose(-2, -1) if _is_conv1d(module) else weight


def default_rank(d_out: int, d_in: int, num_tasks: int) -> int:
    """The paper's default per-task rank: min(d_out, d_in) // T, at least 1."""
    return max(1, min(d_out, d_in) // num_tasks)


def low_rank_factors(deltas: torch.Tensor, rank: int):
    """Per-task truncated SVD of deltas (T, d_out, d_in): U (T, d_out, r), S (T, r),
    V (T, r, d_in) with orthonormal rows, such that U_t diag(S_t) V_t is the best rank-r
    approximation of delta t (exact when its rank is <= r). Computed in float64."""
    T, d_out, d_in = deltas.shape
    if not 1 <= rank <= min(d_out, d_in):
        raise ValueError(f"rank must be in 1..min(d_out, d_in) = 1..{min(d_out, d_in)}, got {rank}")
    U, S, Vh = torch.linalg.svd(deltas.to(torch.float64), full_matrices=False)
    return U[..., :rank], S[..., :rank], Vh[..., :rank, :]


def check_rank(rank) -> None:
    """A per-task rank option: a positive int, or None for the default."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive int or None (default), got {rank!r}")


def task_factors(linear: nn.Module, deltas_or_weights, *, rank: Optional[int] = None,
                 are_deltas: bool = False, decorrelate: bool = False):
    """(U, S, V) of a routed layer, in the layer's dtype, from a base nn.Linear (or
    transformers' Conv1D) and T fine-tuned weights (or deltas) in the layer's own layout:
    per-task truncated SVD (float64) of rank `rank` (default min(d_out, d_in) // T),
    optionally decorrelated across tasks."""
    if not is_linear(linear):
        raise TypeError(f"linear must be an nn.Linear or transformers' Conv1D, got "
                        f"{type(linear).__name__}")
    if len(deltas_or_weights) == 0:
        raise ValueError("deltas_or_weights must hold at least one task's weight, got none")
    check_rank(rank)
    stacked = torch.stack([torch.as_tensor(t) for t in deltas_or_weights]).to(linear.weight.device)
    if stacked.shape[1:] != linear.weight.shape:
        raise ValueError(
            f"deltas_or_weights must each have the shape of linear.weight "
            f"{tuple(linear.weight.shape)}, got {tuple(stacked.shape[1:])}")
    W0, stacked = linear_weight(linear).detach(), linear_weight(linear, stacked)
    deltas = stacked.to(torch.float64) - (0 if are_deltas else W0.to(torch.float64))
    T, d_out, d_in = deltas.shape
    U, S, V = low_rank_factors(deltas, default_rank(d_out, d_in, T) if rank is None else rank)
    if decorrelate:
        U, V = decorrelate_factors(U, V)
    return U.to(W0.dtype), S.to(W0.dtype), V.to(W0.dtype)


def decorrelate_factors(U: torch.Tensor, V: torch.Tensor):
    """TSV-style decorrelation: replace the stacked U (d_out, T r) and V (T r, d_in) by the
    nearest matrices with orthonormal columns/rows (polar factor), so that different tasks'
    subspaces do not overlap. Needs T * r <= min(d_out, d_in)."""
    T, d_out, r = U.shape
    d_in = V.shape[-1]
    if T * r > min(d_out, d_in):
        raise ValueError(
            f"decorrelation needs T * r <= min(d_out, d_in) = {min(d_out, d_in)}, got {T} * {r}")

    def polar(m):  # nearest matrix with orthonormal columns
        P, _, Qh = torch.linalg.svd(m, full_matrices=False)
        return P @ Qh

    U_stacked = polar(U.permute(1, 0, 2).reshape(d_out, T * r))
    V_stacked = polar(V.reshape(T * r, d_in).T).T
    return U_stacked.reshape(d_out, T, r).permute(1, 0, 2), V_stacked.reshape(T, r, d_in)


def _tasks_without_orthonormal_rows(V: torch.Tensor) -> list:
    """Tasks t whose V[t] (r, d_in) moves probe vectors q off V[t] V[t]^T q = q by more
    than 5%: far above any dtype's rounding (a bfloat16 V, or one rounded through it),
    far below what a wrong V does (scaled by S, transposed). O(T r d_in), not the Gram
    matrix's O(T r^2 d_in)."""
    T, r, _ = V.shape
    if V.numel() == 0:
        return []
    probes = torch.randn(T, r, 2, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64).to(V.device)
    V64 = V.detach().to(torch.float64)
    moved = (V64 @ (V64.transpose(1, 2) @ probes) - probes).flatten(1).norm(dim=1)
    return (moved > 0.05 * probes.flatten(1).norm(dim=1)).nonzero().flatten().tolist()


def _tasks_with_non_finite(factor: torch.Tensor) -> list:
    return (~torch.isfinite(factor)).flatten(1).any(1).nonzero().flatten().tolist()


def task_set_groups(indices: torch.Tensor, weights: torch.Tensor):
    """The distinct task sets of a routing (rows, k): (keys, ids), keys[g] the g-th set as
    ((task, weight), ...) by task id, without dropped (-1) or zero-weight slots, ids (rows,)
    int64 each row's g. None when a weight is not finite."""
    w = weights.to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        return None
    dropped = (indices < 0) | (w == 0)
    tasks, order = torch.where(dropped, -1, indices).sort(dim=-1, stable=True)
    w = torch.where(dropped, 0.0, w).gather(-1, order)
    distinct, ids = torch.unique(torch.cat([tasks.to(torch.float64), w], dim=-1), dim=0,
                                 return_inverse=True)
    k = indices.shape[-1]
    keys = [tuple((int(t), c) for t, c in zip(row[:k], row[k:]) if t >= 0)
            for row in distinct.tolist()]
    return keys, ids


class _RouteState(threading.local):
    """Per-thread routing instruction shared by the RoutedLinear layers of one model, so
    that threads calling the same model at once do not see each other's routing."""

    def __init__(self):
        self.mode = None            # None (no pass under way) | "self" | "base" | "prerouted"
        self.indices = None         # (B, k) per sample, for "prerouted"
        self.weights = None
        self.repeat_samples = False  # "prerouted": a batch of m * B rows is each sample m times
        self.repeated = {}           # rows (or a flattened shape) -> repeated (indices, weights);
                                     # ("task_sets", id) -> task_set_groups of a routing
        self.tokens = None           # (B, L) of the last (B, L, d) input of a routed layer

    def routing_for(self, rows: int):
        """(indices, weights) for a batch of `rows` rows: as given, or with repeat_samples
        each sample repeated rows // B times (computed once for all layers)."""
        B = self.indices.shape[0]
        if not (self.repeat_samples and B and rows != B and rows % B == 0):
            return self.indices, self.weights
        if rows not in self.repeated:
            self.repeated[rows] = (self.indices.repeat_interleave(rows // B, 0),
                                   self.weights.repeat_interleave(rows // B, 0))
        return self.repeated[rows]

    def flattened_tokens(self, x: torch.Tensor) -> Optional[tuple]:
        """(B, L) when x (B * L, d) is the tokens of the last (B, L, d) input a routed layer
        saw in this pass, flattened sample-major (OPT's MLP, Qwen2-MoE's shared expert
        reshape(-1, d)); else None."""
        tokens = self.tokens
        if x.dim() == 2 and tokens is not None and x.shape[0] == tokens[0] * tokens[1]:
            return tokens
        return None

    def flattened_routing(self, batch: int, length: int):
        """(indices, weights) (batch * length, k) for the rows of a (batch, length) input
        flattened sample-major: each sample's decision `length` times in a row."""
        key = ("flattened", batch, length)
        if key not in self.repeated:
            indices, weights = self.routing_for(batch)
            self.repeated[key] = (indices.repeat_interleave(length, 0),
                                  weights.repeat_interleave(length, 0))
        return self.repeated[key]

    def task_sets(self, indices: torch.Tensor, weights: torch.Tensor):
        """task_set_groups(indices, weights), computed once per pass for each routing
        tensor the layers apply (they share routing_for's and flattened_routing's)."""
        key = ("task_sets", id(indices))
        if key not in self.repeated:  # holds indices, so its id is not reused in the pass
            self.repeated[key] = (indices, task_set_groups(indices, weights))
        return self.repeated[key][1]

    def __reduce__(self):
        # Copies and pickles start with no routing instruction (thread-locals do not pickle).
        return (_RouteState, ())


class RoutedLinear(nn.Module):
    """nn.Linear plus T low-rank task updates, routed per input row.

    Semantics: y = mass_ext.routed_linear(x, weight, bias, U, S, V, top_k, ...), i.e.
    F.linear(x, weight, bias) + sum over the selected tasks t of w_t U_t (S_t * V_t x).

    Attributes: weight (d_out, d_in) and bias (d_out,) as in nn.Linear; U (T, d_out, r)
    stored column-major per task (the layout the CPU expand reads fastest), S (T, r),
    V (T, r, d_in). Routing options: top_k, temperature, threshold, weighting.

    A model-level MASS wrapper may instead route whole samples once (two-pass) and have
    every RoutedLinear apply that decision: see `mass_ext.MASS`.
    """

    def __init__(self, weight, bias, U, S, V, *, top_k=1, temperature=1.0, threshold=0.0,
                 weighting="uniform"):
        super().__init__()
        # The op's own shape/dtype/option checks, now rather than at the first call, on an
        # empty input of the right width.
        check_layer_inputs(weight.new_empty(0, weight.shape[-1]), weight, bias, U, S, V)
        options = check_routing_options(top_k, V.shape[0], temperature, threshold, weighting)
        # The op assumes finite factors (checking them would cost a pass over U, S and V
        # per call): a non-finite entry of one task may spoil rows routed elsewhere.
        for name, factor in (("U", U), ("S", S), ("V", V)):
            if not bool(torch.isfinite(factor).all()):
                raise ValueError(f"{name} must be finite: it holds NaN or inf in task(s) "
                                 f"{_tasks_with_non_finite(factor)}")
        bad = _tasks_without_orthonormal_rows(V)
        if bad:
            raise ValueError(
                f"V must have orthonormal rows in every task (V[t] V[t]^T = I: routing's "
                f"residuals assume it), but task(s) {bad} do not (a V scaled by S, or V^T "
                "for V?)")
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        # (T, r, d_out) storage; .U is its transposed view (T, d_out, r).
        self.register_buffer("U_t", U.detach().transpose(1, 2).contiguous())
        self.register_buffer("S", S.detach().clone().contiguous())
        self.register_buffer("V", V.detach().clone().contiguous())
        self.top_k, self.temperature, self.threshold, self.weighting = options
        self.state: Optional[_RouteState] = None  # set by MASS
        # What a call outside any MASS pass does: "self" (route each row), or "refuse"
        # (raise; set by a two-pass MASS, whose decisions come from its pass 1).
        self.idle_mode = "self"
        # How many MASS passes (threads) record this layer's input with a forward pre-hook
        # now. The forward reads it: torch.compile does not guard on hooks, and would
        # otherwise run a router layer's enclosing block (a BertLayer) as compiled for a
        # block whose layer had no hook, skipping the hook.
        self.router_input_hooks = 0
        self.last_routing = None                  # (indices, weights) of the last self-routed call
        # Merged-weight cache (MASS.cache_merged_weights): up to merged_cache_size task sets'
        # W + sum_j w_j U_tj diag(S_tj) V_tj, least recently used first, for the factors
        # whose identity and version _merged_stamp records.
        self.merged_cache_size = 0
        self._merged = OrderedDict()
        self._merged_stamp = None

    @property
    def U(self) -> torch.Tensor:
        return self.U_t.transpose(1, 2)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def num_tasks(self) -> int:
        return self.V.shape[0]

    @property
    def rank(self) -> int:
        return self.V.shape[1]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, tasks={self.num_tasks}, rank={self.rank}, "
                f"top_k={self.top_k}, weighting={self.weighting!r}")

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b (pass 1 on the base weights). On CPU in float32 this is the op with
        no task selected, i.e. its own dense GEMM: oneDNN where it beats the MKL that
        F.linear runs (2.1-2.3x on AMD EPYC, csrc/cpu/dense_gemm.cpp); else F.linear."""
        if x.dtype == torch.float32 and ops.backend(x.device) == "cpp":
            none = torch.full((*x.shape[:-1], 1), -1, dtype=torch.long)
            return ops.routed_linear(x, self.weight, self.bias, self.U, self.S, self.V,
                                     indices=none, weights=torch.zeros(none.shape))
        return F.linear(x, self.weight, self.bias)

    def check_input_dtype(self, x: torch.Tensor) -> None:
        if x.dtype != self.weight.dtype:
            raise TypeError(f"this RoutedLinear's weights are {self.weight.dtype}, its input "
                            f"{x.dtype}: cast the input or the model (as nn.Linear, it does "
                            "not mix dtypes)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.router_input_hooks:  # a guard for torch.compile (see __init__)
            pass
        self.check_input_dtype(x)
        mode = "self" if self.state is None else self.state.mode or self.idle_mode
        if mode == "refuse":
            raise RuntimeError(
                "this RoutedLinear belongs to a two-pass MASS model, whose per-sample "
                "decision comes from its pass 1: call the model through the MASS wrapper "
                "(mm(...), mm.run(routing, ...), mm.generate(...) or `with "
                "mm.applying(routing): ...`), or set mm.mode = 'per_layer' to route every row "
                "by itself")
        if x.dim() == 3 and self.state is not None:
            # Recognises a later layer's (B * L, d) input as these tokens flattened.
            self.state.tokens = (x.shape[0], x.shape[1])
        if mode == "base":
            return self._base(x)
        if mode == "self":
            out, indices, weights = ops.self_routed(
                x, self.weight, self.bias, self.U, self.S, self.V, self.top_k, self.temperature,
                self.threshold, self.weighting)
            self.last_routing = (indices, weights)
            return out
        # Per-sample decision (B, k), applied to every row of that sample.
        tokens = self.state.flattened_tokens(x)
        if tokens is not None:  # each row takes its sample's decision
            indices, weights = self.state.flattened_routing(*tokens)

            def expand(t):  # one row of routing per row of x already
                return t
        else:
            indices, weights = self.state.routing_for(x.shape[0] if x.dim() >= 2 else -1)
            B = indices.shape[0]
            if x.dim() < 2 or x.shape[0] != B:
                repeated = (x.dim() >= 2 and B > 0 and x.shape[0] % B == 0
                            and not self.state.repeat_samples)
                hint = (f"; this input's batch is {x.shape[0] // B} x B: if each sample is "
                        "repeated in a row (beams, num_return_sequences), use "
                        "applying(routing, repeat_samples=True), as mm.generate does"
                        if repeated else "")
                raise ValueError(
                    f"the routing applied holds B = {B} samples{hint}, and a routed layer's input "
                    f"must have that batch first (B, ..., in_features), got shape "
                    f"{tuple(x.shape)}: run(routing, ...) and applying(routing) need one "
                    f"routing row per sample of the batch given (two-pass MASS "
                    "applies one decision per sample: a layer that sees the tokens "
                    "sequence-first, a subset of them (a mixture-of-experts expert) or no "
                    "batch (position embeddings) cannot be routed per sample, unlike one that "
                    "sees the (B, L) tokens flattened sample-major; leave it out with "
                    "target=, or use mode='per_layer')")
            lead = x.shape[:-1]
            extra = (1,) * (len(lead) - 1)

            def expand(t):  # per sample (B, ...) -> per row (*lead, ...)
                return t.view(B, *extra, *t.shape[1:]).expand(*lead, *t.shape[1:])
        cached = self._cached_merged_weights(x, indices, weights)
        if cached is not None:
            merged, groups = cached
            return ops.grouped_linear(x, merged, self.bias, expand(groups))
        return ops.routed_linear(x, self.weight, self.bias, self.U, self.S, self.V,
                                 indices=expand(indices), weights=expand(weights))

    # ------------------------------------------------------------ merged-weight cache
    def _cached_merged_weights(self, x, indices, weights):
        """(merged weights, group of each routing row) from the cache, filling it, or None
        where the cache does not apply: it is off, x is not on the CPU with the C++ kernel,
        the call is being compiled (the bookkeeping is Python: the graph keeps the op),
        autograd needs the op's backward, a weight is not finite, or the routing holds more
        task sets than the cache keeps (merging them all anew every call would cost more
        than the op, which merges only large groups). x has the layer's dtype (forward
        checked it)."""
        if (self.merged_cache_size <= 0 or ops.backend(x.device) != "cpp"
                or torch.compiler.is_compiling()):
            return None
        if torch.is_grad_enabled() and any(
                t is not None and t.requires_grad
                for t in (x, self.weight, self.bias, self.U_t, self.S, self.V, weights)):
            return None
        sets = self.state.task_sets(indices, weights)
        if sets is None or len(sets[0]) > self.merged_cache_size:
            return None
        keys, groups = sets
        stamp = self._factor_stamp()
        if stamp != self._merged_stamp:  # the layer's tensors changed: start afresh
            self._merged, self._merged_stamp = OrderedDict(), stamp
        entries = self._merged
        merged = []
        for key in keys:
            weight = entries.get(key)
            if weight is None:
                weight = entries[key] = self._merge(key)
            else:
                entries[key] = entries.pop(key, weight)  # most recently used
            merged.append(weight)
        while len(entries) > self.merged_cache_size:
            try:
                entries.popitem(last=False)
            except KeyError:  # another thread emptied it meanwhile
                break
        return merged, groups

    def _factor_stamp(self) -> tuple:
        """What the merged weights depend on: each tensor's storage, dtype, shape and
        version (in-place changes bump it; inference tensors have none)."""
        def identity(t):
            try:
                version = t._version
            except RuntimeError:
                version = None
            return t.data_ptr(), t.dtype, t.device, tuple(t.shape), version
        return tuple(identity(t) for t in (self.weight, self.U_t, self.S, self.V))

    def _merge(self, key: tuple) -> torch.Tensor:
        """W + sum_j w_j U_tj diag(S_tj) V_tj of one task set, in the accumulation dtype
        (W itself for the empty set)."""
        acc = acc_dtype(self.weight.dtype)
        W = self.weight.detach().to(acc)
        if not key:
            return W
        tasks = [t for t, _ in key]
        scale = self.S[tasks].to(acc) * torch.tensor([w for _, w in key], dtype=acc,
                                                     device=W.device)[:, None]
        lhs = (self.U_t[tasks].to(acc) * scale[:, :, None]).reshape(-1, W.shape[0])
        return torch.addmm(W, lhs.T, self.V[tasks].to(acc).reshape(-1, W.shape[1]))

    def clear_merged_cache(self) -> None:
        """Drops the cached merged weights (needed only after changing the layer's tensors
        in a way their version does not record, e.g. through .data)."""
        self._merged, self._merged_stamp = OrderedDict(), None

    def merged_cache_bytes(self) -> int:
        """Bytes the cached merged weights hold (the empty set's entry, W itself, none)."""
        return sum(t.numel() * t.element_size() for t in self._merged.values()
                   if t.data_ptr() != self.weight.data_ptr())

    @classmethod
    def from_linear(cls, linear: nn.Linear, deltas_or_weights: Sequence[torch.Tensor] | torch.Tensor,
                    *, rank: Optional[int] = None, are_deltas: bool = False,
                    bias: Optional[torch.Tensor] = None, decorrelate: bool = False,
                    **routing) -> "RoutedLinear":
        """Builds the routed layer from a base nn.Linear (or transformers' Conv1D) and T
        fine-tuned weights of the same shape (or, with are_deltas=True, T task deltas
        W_t - W_0), in the layer's own layout.

        rank: per-task rank r, default min(d_out, d_in) // T; bias: the bias to use
        (default the base layer's); decorrelate: TSV-style orthogonalisation of the stacked
        factors across tasks; routing: top_k, temperature, threshold, weighting."""
        U, S, V = task_factors(linear, deltas_or_weights, rank=rank, are_deltas=are_deltas,
                               decorrelate=decorrelate)
        W0 = linear_weight(linear).detach()
        b = linear.bias if bias is None else bias
        return cls(W0, None if b is None else b.detach(), U, S, V, **routing)
