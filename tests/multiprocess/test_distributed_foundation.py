"""DeepSpeed ZeRO x megatron-core tensor parallelism on real multi-process gloo groups (CPU).

Each test spawns its ranks with tests/dist_utils.py; the rank bodies compute the distributed
result *and* a single-process reference from the same seed, and return the numbers; the
assertions run here in pytest.
"""
from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dist_utils import DistributedFailure, run_distributed

pytestmark = pytest.mark.slow

TOL = 1e-5


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.detach() - b.detach()).abs().max().item()


# --- single-process pieces ------------------------------------------------------------------------

def test_layout_puts_tensor_parallel_ranks_next_to_each_other():
    from stts_dist.distributed.parallel import ParallelLayout

    grid = [ParallelLayout(world_size=8, tensor_parallel=2, rank=r) for r in range(8)]
    assert [(g.tensor_parallel_rank, g.data_parallel_rank) for g in grid[:4]] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert {g.data_parallel for g in grid} == {4}
    with pytest.raises(ValueError, match="tensor_parallel=4 does not divide the world size 6"):
        ParallelLayout(world_size=6, tensor_parallel=4, rank=0)


def test_joining_without_launcher_environment_names_the_missing_variables(monkeypatch):
    from stts_dist.distributed.parallel import init_process_group

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match=r"\['RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'\].*torchrun"):
        init_process_group()


def test_deepspeed_config_from_settings():
    from stts_dist.distributed.deepspeed_engine import DeepSpeedSettings

    cfg = DeepSpeedSettings(zero_stage=3, micro_batch_size=4, grad_accum=2, grad_clip=0.5, dtype="auto",
                            stage3_param_persistence_threshold=0).to_config(data_parallel=3)
    assert cfg["train_batch_size"] == 4 * 2 * 3
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    assert cfg["zero_allow_untested_optimizer"] is True
    assert cfg["bf16"]["enabled"] is torch.cuda.is_available()  # bf16 on GPU, fp32 on CPU
    assert DeepSpeedSettings(zero_stage=2).to_config(1)["zero_optimization"] == {"stage": 2}
    with pytest.raises(ValueError, match="zero_stage=4 must be 1, 2 or 3"):
        DeepSpeedSettings(zero_stage=4)


def test_deepspeed_settings_keep_the_run_config_global_batch(tiny_cfg):
    from stts_dist.distributed.deepspeed_engine import DeepSpeedSettings

    tiny_cfg.train.batch_size = 8
    settings = DeepSpeedSettings.from_run_config(tiny_cfg, data_parallel=2, grad_accum=2)
    assert (settings.micro_batch_size, settings.grad_accum, settings.grad_clip) == (2, 2, tiny_cfg.optim.grad_clip)
    assert settings.to_config(2)["train_batch_size"] == 8
    with pytest.raises(ValueError, match="train.batch_size=8 .* not divisible by data_parallel=3"):
        DeepSpeedSettings.from_run_config(tiny_cfg, data_parallel=3)


def test_cpu_workarounds_are_never_applied_when_a_gpu_is_visible(monkeypatch):
    from stts_dist.distributed import megatron_cpu_compat

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    current_device = torch.cuda.current_device
    assert megatron_cpu_compat.apply_if_no_gpu() == ()
    assert torch.cuda.current_device is current_device


# --- tensor-parallel layers vs plain torch (TP=2) -------------------------------------------------

def _tp_layers_body(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state as ps

    from stts_dist.distributed import tp_layers as tpl
    from stts_dist.distributed.parallel import current_layout, initialize_parallel

    layout = initialize_parallel(tensor_parallel=2)
    assert current_layout() == layout
    out: dict = {"layout": (layout.tensor_parallel_rank, layout.data_parallel_rank, layout.data_parallel),
                 "megatron": (ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(),
                              ps.get_data_parallel_world_size())}

    # Same seed, same full weights as nn.Linear / nn.Embedding, at any TP size.
    torch.manual_seed(3)
    plain_linear, plain_emb = nn.Linear(8, 16), nn.Embedding(11, 8)
    torch.manual_seed(3)
    tp_linear, tp_emb = tpl.column_parallel(8, 16), tpl.vocab_parallel_embedding(11, 8)
    out["init_linear"] = max(_max_diff(tp_linear.full_weight(), plain_linear.weight),
                             _max_diff(tp_linear.full_bias(), plain_linear.bias))
    out["init_embedding"] = _max_diff(tp_emb.full_weight(), plain_emb.weight)
    out["local_shapes"] = (tuple(tp_linear.weight.shape), tuple(tp_emb.weight.shape))

    # MLP: column (sliced output) -> row (sliced input), and the gather/scatter variant.
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
    x_ref = torch.randn(2, 3, 8, requires_grad=True)
    x_tp = x_ref.detach().clone().requires_grad_(True)
    y_ref = fc2(F.gelu(fc1(x_ref)))
    y_ref.square().sum().backward()
    for name, gather in (("mlp_parallel", False), ("mlp_gathered", True)):
        x_tp.grad = None
        col = tpl.ColumnParallelLinear.from_linear(fc1, gather_output=gather)
        row = tpl.RowParallelLinear.from_linear(fc2, input_is_parallel=not gather)
        y_tp = row(F.gelu(col(x_tp)))
        y_tp.square().sum().backward()
        out[name] = {
            "output": _max_diff(y_tp, y_ref),
            "grad_x": _max_diff(x_tp.grad, x_ref.grad),
            "grad_fc1_w": _max_diff(tpl.gather_to_full(col.weight.grad, 0), fc1.weight.grad),
            "grad_fc1_b": _max_diff(tpl.gather_to_full(col.bias.grad, 0), fc1.bias.grad),
            "grad_fc2_w": _max_diff(tpl.gather_to_full(row.weight.grad, 1), fc2.weight.grad),
            "grad_fc2_b": _max_diff(row.bias.grad, fc2.bias.grad),
        }

    # Embedding + LM loss over an odd vocabulary (11, padded to 12), untied head and tied head.
    torch.manual_seed(1)
    vocab, dim = 11, 8
    emb, head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab, bias=False)
    ids = torch.randint(0, vocab, (2, 5))
    labels = torch.randint(0, vocab, (2, 5))
    labels[0, :2] = -100  # prompt tokens carry no loss
    h_ref = emb(ids)
    loss_untied_ref = F.cross_entropy(head(h_ref).flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss_tied_ref = F.cross_entropy((h_ref @ emb.weight.t()).flatten(0, 1), labels.flatten(), ignore_index=-100)
    (loss_untied_ref + loss_tied_ref).backward()

    tp_emb = tpl.VocabParallelEmbedding.from_embedding(emb)
    tp_head = tpl.column_parallel(dim, tp_emb.padded_vocab_size, bias=False)
    tp_head.load_full_(torch.cat([head.weight.detach(), torch.randn(1, dim)]))  # padding row: any value
    h_tp = tp_emb(ids)
    loss_untied = tpl.vocab_parallel_lm_loss(tp_head(h_tp), labels, vocab_size=vocab)
    loss_tied = tpl.vocab_parallel_lm_loss(tpl.TiedVocabParallelHead(tp_emb)(h_tp), labels, vocab_size=vocab)
    (loss_untied + loss_tied).backward()
    out["lm"] = {
        "embedding_output": _max_diff(h_tp, h_ref),
        "loss_untied": abs(loss_untied.item() - loss_untied_ref.item()),
        "loss_tied": abs(loss_tied.item() - loss_tied_ref.item()),
        "grad_embedding": _max_diff(tpl.gather_to_full(tp_emb.weight.grad, 0)[:vocab], emb.weight.grad),
        "grad_head": _max_diff(tpl.gather_to_full(tp_head.weight.grad, 0)[:vocab], head.weight.grad),
        "grad_head_padding_row": tpl.gather_to_full(tp_head.weight.grad, 0)[vocab:].abs().max().item(),
    }
    out["loss_value"] = loss_untied.item()
    return out


def test_tensor_parallel_layers_match_plain_torch_at_tp2():
    results = run_distributed(_tp_layers_body, 2)
    for rank, r in enumerate(results):
        assert r["layout"] == r["megatron"] == (rank, 0, 1)
        assert r["init_linear"] == 0.0 and r["init_embedding"] == 0.0
        assert r["local_shapes"] == ((8, 8), (6, 8))  # half of 16 output rows; half of 12 padded vocab rows
        for check in ("mlp_parallel", "mlp_gathered", "lm"):
            for key, diff in r[check].items():
                assert diff <= TOL, f"rank {rank} {check}.{key}: max |TP - plain| = {diff:.3g}"
    assert results[0]["loss_value"] == results[1]["loss_value"]  # every TP rank sees the same loss


# --- DeepSpeed ZeRO-3, data parallel only (DP=2) --------------------------------------------------

def _global_batch(seed: int, n: int, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)


def _reference_training(model: nn.Module, loss_fn, steps: int, lr: float, clip: float) -> tuple[list, list]:
    """Single-process torch AdamW on the whole global batch: (losses, grad norms before clipping)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses, norms = [], []
    for _ in range(steps):
        loss = loss_fn(model)
        opt.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item())
        opt.step()
        losses.append(loss.item())
    return losses, norms


def _zero3_dp_body(rank: int, world_size: int) -> dict:
    import deepspeed
    from megatron.core import parallel_state as ps

    from stts_dist.distributed.deepspeed_engine import DeepSpeedSettings, initialize_engine
    from stts_dist.distributed.parallel import initialize_parallel

    initialize_parallel(tensor_parallel=1)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 33), nn.GELU(), nn.Linear(33, 4))  # 33: uneven split
    reference = copy.deepcopy(model)
    full_numel = {n: p.numel() for n, p in model.named_parameters()}
    lr, clip, micro = 1e-2, 0.05, 4
    settings = DeepSpeedSettings(zero_stage=3, micro_batch_size=micro, grad_clip=clip,
                                 stage3_param_persistence_threshold=0)
    engine = initialize_engine(model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01), settings)

    partition = {n: (p.ds_tensor.numel(), p.ds_numel, p.numel()) for n, p in engine.module.named_parameters()}
    shm_op_built = deepspeed.comm.comm.cdb.shm_comm_op is not None
    x, y = _global_batch(0, micro * dp, 6, 4)
    local = slice(dp_rank * micro, (dp_rank + 1) * micro)
    losses, grad_norms = [], []
    for _ in range(3):
        loss = F.mse_loss(engine(x[local]), y[local])
        engine.backward(loss)
        engine.step()
        grad_norms.append(float(engine.get_global_grad_norm()))
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss, group=ps.get_data_parallel_group())
        losses.append(global_loss.item() / dp)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        trained = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    ref_losses, ref_norms = _reference_training(reference, lambda m: F.mse_loss(m(x), y), 3, lr, clip)
    param_diff = max(_max_diff(trained[n], p) for n, p in reference.named_parameters())
    return {"dp": dp, "shm_op_built": shm_op_built, "full_numel": full_numel, "partition": partition, "losses": losses,
            "grad_norms": grad_norms, "ref_losses": ref_losses, "ref_grad_norms": ref_norms, "clip": clip, "param_diff": param_diff}


def _assert_training_matches(r: dict) -> None:
    """Engine losses and global grad norms (before clipping) equal the single-process ones."""
    for key in ("losses", "grad_norms"):
        got, want = r[key], r["ref_" + key]
        assert len(got) == len(want) == 3
        for step, (a, b) in enumerate(zip(got, want)):
            assert abs(a - b) <= TOL * abs(b), f"step {step}: engine {key} {a!r} vs single-process {b!r}"
    assert r["ref_losses"][0] > r["ref_losses"][1] > r["ref_losses"][2]  # same batch every step: it trained
    assert min(r["ref_grad_norms"]) > r["clip"]  # clipping was active in every step


def test_zero3_partitions_parameters_and_matches_single_process_adamw():
    results = run_distributed(_zero3_dp_body, 2)
    for r in results:
        assert r["dp"] == 2
        assert not r["shm_op_built"]  # the ~40 s JIT build of DeepSpeed's CPU inference op was skipped
        for name, (local, total, visible) in r["partition"].items():
            assert total == r["full_numel"][name]
            assert local == -(-total // 2), f"{name}: rank holds {local} of {total} elements"
            assert visible == 0, f"{name}: full parameter still materialised outside forward"
        _assert_training_matches(r)
        assert r["param_diff"] <= TOL
    assert results[0]["losses"] == results[1]["losses"]


# --- TP=2 x DP=2: tensor-parallel model inside a ZeRO-3 engine (4 processes) ----------------------

class TinyLM(nn.Module):
    """Embedding -> pre-norm MLP block (residual) -> tied LM head; built from plain nn layers."""

    def __init__(self, vocab: int, dim: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.down(F.gelu(self.up(self.norm(h))))
        return h @ self.embed.weight.t()

    def loss(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(ids).flatten(0, 1), labels.flatten())


class TinyLMTensorParallel(nn.Module):
    """TinyLM with its embedding, MLP and head swapped for the tensor-parallel layers."""

    def __init__(self, plain: TinyLM):
        super().__init__()
        from stts_dist.distributed import tp_layers as tpl

        self.embed = tpl.VocabParallelEmbedding.from_embedding(plain.embed)
        self.norm = copy.deepcopy(plain.norm)  # replicated on the TP group
        self.up = tpl.ColumnParallelLinear.from_linear(plain.up)
        self.down = tpl.RowParallelLinear.from_linear(plain.down)
        self.head = tpl.TiedVocabParallelHead(self.embed)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from stts_dist.distributed import tp_layers as tpl

        h = self.embed(ids)
        h = h + self.down(F.gelu(self.up(self.norm(h))))
        return tpl.vocab_parallel_lm_loss(self.head(h), labels, vocab_size=self.head.vocab_size)


def _tp_dp_zero3_body(rank: int, world_size: int) -> dict:
    import deepspeed
    from megatron.core import parallel_state as ps

    from stts_dist.distributed.deepspeed_engine import DeepSpeedSettings, initialize_engine
    from stts_dist.distributed.parallel import initialize_parallel

    layout = initialize_parallel(tensor_parallel=2)
    vocab, dim, hidden, micro, seq = 13, 8, 32, 2, 5  # vocab 13 -> padded to 14
    torch.manual_seed(0)
    plain = TinyLM(vocab, dim, hidden)
    reference = copy.deepcopy(plain)
    model = TinyLMTensorParallel(plain)
    local_numel = {n: p.numel() for n, p in model.named_parameters()}
    lr, clip = 1e-2, 0.05
    settings = DeepSpeedSettings(zero_stage=3, micro_batch_size=micro, grad_clip=clip,
                                 stage3_param_persistence_threshold=0)
    engine = initialize_engine(model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01), settings)
    partition = {n: (p.ds_tensor.numel(), p.ds_numel) for n, p in engine.module.named_parameters()}

    g = torch.Generator().manual_seed(1)
    global_batch = micro * layout.data_parallel
    ids = torch.randint(0, vocab, (global_batch, seq), generator=g)
    labels = torch.randint(0, vocab, (global_batch, seq), generator=g)
    local = slice(layout.data_parallel_rank * micro, (layout.data_parallel_rank + 1) * micro)
    losses, grad_norms = [], []
    for _ in range(3):
        loss = engine(ids[local], labels[local])
        engine.backward(loss)
        engine.step()
        grad_norms.append(float(engine.get_global_grad_norm()))
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss, group=ps.get_data_parallel_group())
        losses.append(global_loss.item() / layout.data_parallel)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        trained_up = engine.module.up.full_weight()
    ref_losses, ref_norms = _reference_training(reference, lambda m: m.loss(ids, labels), 3, lr, clip)
    return {"layout": (layout.tensor_parallel_rank, layout.data_parallel_rank), "local_numel": local_numel,
            "partition": partition, "losses": losses, "grad_norms": grad_norms, "ref_losses": ref_losses,
            "ref_grad_norms": ref_norms,
            "clip": clip, "up_weight_diff": _max_diff(trained_up, reference.up.weight)}


def test_tensor_parallel_model_trains_in_zero3_engine_like_single_process():
    results = run_distributed(_tp_dp_zero3_body, 4)
    assert [r["layout"] for r in results] == [(0, 0), (1, 0), (0, 1), (1, 1)]  # TP is the inner index
    for r in results:
        for name, (local, total) in r["partition"].items():
            assert total == r["local_numel"][name]  # ZeRO partitions this rank's TP slice ...
            assert local == -(-total // 2), f"{name}: {local} of {total}"  # ... over DP=2
        assert r["partition"]["up.weight"][1] == 32 * 8 // 2
        assert r["partition"]["embed.weight"][1] == 14 * 8 // 2
        _assert_training_matches(r)
        assert r["up_weight_diff"] <= TOL
    assert len({tuple(r["losses"]) for r in results}) == 1


# --- failures: no rank may hang the others --------------------------------------------------------

def _raise_mid_step_body(rank: int, world_size: int, collective_timeout_s: float) -> None:
    from stts_dist.distributed.deepspeed_engine import DeepSpeedSettings, initialize_engine
    from stts_dist.distributed.parallel import initialize_parallel

    initialize_parallel(tensor_parallel=1, timeout_s=collective_timeout_s)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 1))
    engine = initialize_engine(model, torch.optim.AdamW(model.parameters()),
                               DeepSpeedSettings(stage3_param_persistence_threshold=0))
    for step in range(2):
        loss = engine(torch.randn(1, 4)).square().mean()
        if step == 1 and rank == 1:
            raise RuntimeError("injected failure on rank 1 between forward and backward")
        engine.backward(loss)  # rank 0 waits here for rank 1's gradient reduce-scatter
        engine.step()


def test_rank_raising_mid_step_stops_every_rank_with_its_traceback():
    collective_timeout_s = 30.0
    with pytest.raises(DistributedFailure) as caught:
        run_distributed(_raise_mid_step_body, 2, collective_timeout_s, timeout_s=90)
    failures = caught.value.failures
    assert [f.rank for f in failures] == [1, 0]  # the cause first
    assert all(f.kind == "raised" for f in failures)  # rank 0 stopped by itself, was not killed
    assert "RuntimeError: injected failure on rank 1" in failures[0].detail
    assert "RuntimeError: injected failure on rank 1" in str(caught.value)
    # The dead rank's closed sockets fail the waiting collective at once, not at its timeout.
    assert failures[1].seconds - failures[0].seconds < collective_timeout_s / 3


COLLECTIVE_TIMEOUT_S = 4.0


def _stuck_rank_body(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state as ps

    from stts_dist.distributed.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(tensor_parallel=2, timeout_s=COLLECTIVE_TIMEOUT_S)
    waited = {}
    if rank == 1:  # stalls (alive, sockets open) past the timeout and joins nothing
        time.sleep(COLLECTIVE_TIMEOUT_S + 2)
    else:
        start = time.monotonic()
        pending = {"tensor_parallel": dist.all_reduce(torch.ones(3), group=ps.get_tensor_model_parallel_group(),
                                                      async_op=True),
                   "world": dist.all_reduce(torch.ones(3), async_op=True)}
        for name, work in pending.items():
            try:
                work.wait()
                waited[name] = (time.monotonic() - start, "completed")
            except RuntimeError as err:
                waited[name] = (time.monotonic() - start, str(err))
    destroy_parallel()  # groups are unusable after a timeout: leave before the helper's final barrier
    return waited


def test_collectives_time_out_instead_of_waiting_for_a_stuck_rank():
    waiting_rank = run_distributed(_stuck_rank_body, 2, timeout_s=60)[0]
    for group in ("tensor_parallel", "world"):
        seconds, message = waiting_rank[group]
        assert "timed out" in message.lower(), f"{group}: {message}"
        assert COLLECTIVE_TIMEOUT_S - 0.5 <= seconds <= COLLECTIVE_TIMEOUT_S + 3, f"{group}: {seconds:.2f} s"
