"""Tensor-parallel Linear / Embedding layers with the ``torch.nn`` call convention.

Thin subclasses of megatron-core's ``tensor_parallel`` layers: ``y = layer(x)`` returns only the
tensor (bias added inside), inputs may have any number of leading dims, and parameters are named
``weight`` / ``bias`` like ``nn.Linear`` / ``nn.Embedding``, so a model written with plain
``nn.Linear`` can swap its modules and load the same (unsharded) state.

Initialisation is ours, not megatron's (``perform_initialization=False``): each layer draws the
*full* matrix exactly as ``nn.Linear`` / ``nn.Embedding`` would and keeps its slice. Under the same
seed, TP=1, TP=2 and the plain-``nn`` model therefore hold identical full weights. Every rank of a
TP group must use the same seed (the usual convention).

Sharding (TP = tensor-parallel size, r = this rank's TP index):

- ColumnParallelLinear: ``weight`` rows [r*out/TP, (r+1)*out/TP), ``bias`` likewise.
  Input replicated; output sliced on the last dim (or gathered with ``gather_output=True``).
- RowParallelLinear: ``weight`` columns [r*in/TP, (r+1)*in/TP); ``bias`` whole on every rank,
  added once after the all-reduce. Input sliced on the last dim (``input_is_parallel=True``).
- VocabParallelEmbedding: rows of the (vocab padded to a TP multiple, dim) table.

Requires :func:`stts_dist.distributed.parallel.initialize_parallel` first (also for TP=1).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel as mtp
from megatron.core.model_parallel_config import ModelParallelConfig


def _config(dtype: torch.dtype) -> ModelParallelConfig:
    return ModelParallelConfig(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        params_dtype=dtype,
        # Allocate on the CPU when there is no GPU (megatron's GPU path calls torch.cuda directly).
        use_cpu_initialization=not torch.cuda.is_available(),
        # We initialise from a full matrix ourselves (see reset_parameters) so that every TP size
        # gets the same numbers; megatron's own init would depend on its CUDA RNG tracker.
        perform_initialization=False,
    )


def _initialised_by_wrapper(weight: torch.Tensor) -> None:
    """megatron requires an init_method; with perform_initialization=False it is never called."""


def _tp_rank_and_size() -> tuple[int, int]:
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def _flatten_leading(x: torch.Tensor) -> torch.Tensor:
    # megatron's weight-gradient code handles 2-D and 3-D inputs only; 2-D covers every shape.
    return x.reshape(-1, x.shape[-1])


# --- full <-> shard ------------------------------------------------------------------------------

def shard_from_full(weight: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """Slice ``rank`` of ``world`` equal slices of ``weight`` along ``dim`` (a contiguous copy)."""
    size = weight.shape[dim]
    if size % world != 0:
        raise ValueError(f"cannot split dim {dim} of size {size} (shape {tuple(weight.shape)}) into "
                         f"{world} equal tensor-parallel shards; make it a multiple of {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} is outside the tensor-parallel group of {world}")
    return weight.narrow(dim, rank * (size // world), size // world).contiguous().clone()


def gather_to_full(shard: torch.Tensor, dim: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate the TP group's shards along ``dim`` (inverse of :func:`shard_from_full`).

    No autograd: for checking and exporting weights or gradients."""
    group = group if group is not None else ps.get_tensor_model_parallel_group()
    world = dist.get_world_size(group)
    shard = shard.detach().contiguous()
    if world == 1:
        return shard.clone()
    parts = [torch.empty_like(shard) for _ in range(world)]
    dist.all_gather(parts, shard, group=group)
    return torch.cat(parts, dim=dim)


def padded_vocab_size(vocab_size: int, tensor_parallel: int) -> int:
    """Smallest multiple of ``tensor_parallel`` >= ``vocab_size`` (equal vocab slices per rank)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size} must be >= 1")
    return -(-vocab_size // tensor_parallel) * tensor_parallel


def _check_shape(name: str, got: torch.Tensor, want: tuple[int, ...]) -> None:
    if tuple(got.shape) != want:
        raise ValueError(f"{name} has shape {tuple(got.shape)}, expected the full (unsharded) shape {want}")


# --- layers --------------------------------------------------------------------------------------

class ColumnParallelLinear(mtp.ColumnParallelLinear):
    """``y = x W^T + b`` with W's output rows split over the TP group.

    x: ``[..., in_features]``, the same on every TP rank.
    y: ``[..., out_features / TP]`` (this rank's slice), or ``[..., out_features]`` if gather_output.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 gather_output: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__(in_features, out_features, config=_config(dtype),
                         init_method=_initialised_by_wrapper, bias=bias, gather_output=gather_output)
        self.in_features, self.out_features = in_features, out_features
        # megatron only tags weights it initialised itself; DeepSpeed's grad-norm reads this tag to
        # sum sliced weights over the TP group instead of counting them once.
        mtp.set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)
        self.reset_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, gather_output: bool = False) -> "ColumnParallelLinear":
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    gather_output=gather_output, dtype=linear.weight.dtype)
        layer.load_full_(linear.weight, linear.bias)
        return layer

    def reset_parameters(self) -> None:
        """``nn.Linear``'s init of the full matrix; this rank keeps its rows."""
        full = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        self.load_full_(full.weight, full.bias)

    @torch.no_grad()
    def load_full_(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Load the full ``(out, in)`` weight and ``(out,)`` bias; keep this rank's rows."""
        rank, world = _tp_rank_and_size()
        _check_shape("weight", weight, (self.out_features, self.in_features))
        self.weight.copy_(shard_from_full(weight, 0, rank, world))
        if self.bias is not None:
            if bias is None:
                raise ValueError("this layer has a bias; pass the full bias too")
            _check_shape("bias", bias, (self.out_features,))
            self.bias.copy_(shard_from_full(bias, 0, rank, world))

    def full_weight(self) -> torch.Tensor:
        return gather_to_full(self.weight, dim=0)

    def full_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else gather_to_full(self.bias, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y, _ = super().forward(_flatten_leading(x))
        return y.reshape(*x.shape[:-1], y.shape[-1])


class RowParallelLinear(mtp.RowParallelLinear):
    """``y = x W^T + b`` with W's input columns split over the TP group; partial products are
    all-reduced, then the (unsplit) bias is added once.

    x: ``[..., in_features / TP]`` (input_is_parallel, e.g. a ColumnParallelLinear output) or
    ``[..., in_features]`` (sliced here). y: ``[..., out_features]``, the same on every TP rank.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 input_is_parallel: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__(in_features, out_features, config=_config(dtype),
                         init_method=_initialised_by_wrapper, bias=bias,
                         input_is_parallel=input_is_parallel, skip_bias_add=False)
        self.in_features, self.out_features = in_features, out_features
        mtp.set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=1, stride=1)
        self.reset_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_is_parallel: bool = True) -> "RowParallelLinear":
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    input_is_parallel=input_is_parallel, dtype=linear.weight.dtype)
        layer.load_full_(linear.weight, linear.bias)
        return layer

    def reset_parameters(self) -> None:
        """``nn.Linear``'s init of the full matrix; this rank keeps its columns."""
        full = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        self.load_full_(full.weight, full.bias)

    @torch.no_grad()
    def load_full_(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Load the full ``(out, in)`` weight and ``(out,)`` bias; keep this rank's columns."""
        rank, world = _tp_rank_and_size()
        _check_shape("weight", weight, (self.out_features, self.in_features))
        self.weight.copy_(shard_from_full(weight, 1, rank, world))
        if self.bias is not None:
            if bias is None:
                raise ValueError("this layer has a bias; pass the full bias too")
            _check_shape("bias", bias, (self.out_features,))
            self.bias.copy_(bias)

    def full_weight(self) -> torch.Tensor:
        return gather_to_full(self.weight, dim=1)

    def full_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y, _ = super().forward(_flatten_leading(x))
        return y.reshape(*x.shape[:-1], y.shape[-1])


class VocabParallelEmbedding(mtp.VocabParallelEmbedding):
    """Token embedding with the vocabulary rows split over the TP group.

    ids: ``[...]`` int64 in ``[0, vocab_size)``, the same on every TP rank -> ``[..., dim]``.
    The table is padded with zero rows to ``padded_vocab_size`` (a TP multiple); those rows are
    never looked up. Out-of-range ids are not checked (that would cost a device sync): ids in
    ``[vocab_size, padded)`` return zeros, larger ids return zeros on every rank.
    """

    def __init__(self, vocab_size: int, embedding_dim: int, dtype: torch.dtype = torch.float32):
        _, world = _tp_rank_and_size()
        padded = padded_vocab_size(vocab_size, world)
        super().__init__(padded, embedding_dim, init_method=_initialised_by_wrapper, config=_config(dtype))
        self.vocab_size, self.padded_vocab_size = vocab_size, padded
        mtp.set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)
        self.reset_parameters()

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "VocabParallelEmbedding":
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, dtype=embedding.weight.dtype)
        layer.load_full_(embedding.weight)
        return layer

    def reset_parameters(self) -> None:
        """``nn.Embedding``'s init (N(0, 1)) of the unpadded table; padding rows are zero."""
        self.load_full_(nn.Embedding(self.vocab_size, self.embedding_dim).weight)

    @torch.no_grad()
    def load_full_(self, weight: torch.Tensor) -> None:
        """Load the full ``(vocab_size, dim)`` table (unpadded); keep this rank's rows."""
        rank, world = _tp_rank_and_size()
        _check_shape("embedding weight", weight, (self.vocab_size, self.embedding_dim))
        padded = weight.new_zeros(self.padded_vocab_size, self.embedding_dim)
        padded[: self.vocab_size] = weight
        self.weight.copy_(shard_from_full(padded, 0, rank, world))

    def full_weight(self) -> torch.Tensor:
        """The ``(vocab_size, dim)`` table without padding rows."""
        return gather_to_full(self.weight, dim=0)[: self.vocab_size]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(ids)


# --- constructors with the names used across the codebase ----------------------------------------

def column_parallel(in_features: int, out_features: int, bias: bool = True,
                    gather_output: bool = False) -> ColumnParallelLinear:
    return ColumnParallelLinear(in_features, out_features, bias=bias, gather_output=gather_output)


def row_parallel(in_features: int, out_features: int, bias: bool = True,
                 input_is_parallel: bool = True) -> RowParallelLinear:
    return RowParallelLinear(in_features, out_features, bias=bias, input_is_parallel=input_is_parallel)


def vocab_parallel_embedding(vocab_size: int, dim: int) -> VocabParallelEmbedding:
    return VocabParallelEmbedding(vocab_size, dim)


# --- LM head and loss ----------------------------------------------------------------------------

class TiedVocabParallelHead(nn.Module):
    """LM head that shares the embedding table: hidden ``[..., dim]`` (the same on every TP rank)
    -> this rank's logits slice ``[..., padded_vocab_size / TP]``; feed it to
    :func:`vocab_parallel_lm_loss` with ``vocab_size=head.vocab_size``.

    A module (not a function of ``embedding.weight``) because ZeRO-3 gathers a parameter only in
    the forward of a module that owns it; registering the shared table here makes DeepSpeed gather
    it for the head too (the same arrangement as a tied ``lm_head`` in Hugging Face models)."""

    def __init__(self, embedding: VocabParallelEmbedding):
        super().__init__()
        self.weight = embedding.weight
        self.vocab_size, self.padded_vocab_size = embedding.vocab_size, embedding.padded_vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        _, world = _tp_rank_and_size()
        h = _flatten_leading(hidden)
        # The call megatron's ColumnParallelLinear makes when given an external weight: each rank
        # only sees its vocab slice, so the input gradient is all-reduced over TP in backward.
        logits = mtp.linear_with_grad_accumulation_and_async_allreduce(
            input=h, weight=self.weight, bias=None, gradient_accumulation_fusion=False,
            allreduce_dgrad=world > 1, sequence_parallel=False,
            tp_group=ps.get_tensor_model_parallel_group())
        return logits.reshape(*hidden.shape[:-1], logits.shape[-1])


def vocab_parallel_lm_loss(logits_local: torch.Tensor, labels: torch.Tensor,
                           vocab_size: int | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over tokens whose label != ignore_index, without gathering the vocab.

    logits_local: ``[..., V/TP]`` this rank's slice of the (padded) vocabulary, as produced by
    ``column_parallel(dim, padded_V)`` or :class:`TiedVocabParallelHead`.
    labels: ``[...]`` int64 global token ids (or ignore_index), the same on every TP rank.
    vocab_size: the real vocabulary size when V was padded; padded columns are excluded from the
    softmax, so the result equals ``F.cross_entropy(full_logits[..., :vocab_size], labels)``.
    Returns a scalar, identical on every TP rank (0 when every label is ignored).

    Note: upstream overwrites fp32 ``logits_local`` in place with the softmax (it saves a
    logits-sized buffer); clone it first if you still need the logits afterwards.
    """
    if logits_local.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal logits shape without the vocab "
                         f"dim {tuple(logits_local.shape[:-1])}")
    rank, world = _tp_rank_and_size()
    local_vocab = logits_local.shape[-1]
    if vocab_size is not None:
        if not 0 < vocab_size <= local_vocab * world:
            raise ValueError(f"vocab_size={vocab_size} must be in (0, {local_vocab * world}] "
                             f"(TP={world} x {local_vocab} logits per rank)")
        if (rank + 1) * local_vocab > vocab_size:  # this rank holds padding columns
            column_ids = torch.arange(rank * local_vocab, (rank + 1) * local_vocab, device=logits_local.device)
            # Out of place: the caller's logits stay intact, and padding gets zero probability.
            logits_local = logits_local.masked_fill(column_ids >= vocab_size,
                                                    torch.finfo(logits_local.dtype).min)
    counted = labels != ignore_index
    per_token = mtp.vocab_parallel_cross_entropy(logits_local, labels.masked_fill(~counted, 0))
    return (per_token * counted).sum() / counted.sum().clamp(min=1)
