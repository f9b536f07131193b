"""The STTS algorithm, piece by piece, with values checked by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from stts_dist.ops.attention import VarlenPlan, dense_attention, varlen_attention
from stts_dist.ops.groups import group_patches, ungroup_mask
from stts_dist.stts.budget import TokenBudget, llm_visual_tokens, pruned_groups
from stts_dist.stts.layout import FrameLayout
from stts_dist.stts.packing import gather_packed, pack_kept_tokens, scatter_packed
from stts_dist.stts.scorer import (TokenScorer, key_bias_from_scores, temporal_novelty,
                                   temporal_novelty_loss)
from stts_dist.stts.selection import select_groups


def _budget(method: str, groups: int, ratio: float, **kw) -> TokenBudget:
    """A budget of ``groups`` groups per frame (2x2 patches each) for ``select_groups``."""
    return TokenBudget(method, ratio, groups_per_frame=groups, patches_per_frame=4 * groups, **kw)


def _random_keep(F_, N, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(F_, N, generator=g) > 0.5
    keep[0] = True
    keep[3] = False            # a frame with nothing kept
    keep[5, :] = False
    keep[5, 7] = True          # a frame with a single token
    return keep


@pytest.mark.parametrize("backend", ["bucketed", "padded", "block_diag"])
def test_packed_attention_equals_per_frame_attention(backend):
    torch.manual_seed(0)
    Fr, N, H, d = 8, 16, 2, 8
    keep = _random_keep(Fr, N, 1)
    q, k, v = (torch.randn(Fr, N, H, d) for _ in range(3))
    packed = pack_kept_tokens(keep, backend)
    flat = lambda t: gather_packed(t.reshape(Fr, N, H * d), packed).view(-1, H, d)
    out = varlen_attention(flat(q), flat(k), flat(v), packed.plan)
    out_full = scatter_packed(out.reshape(-1, H * d), packed).view(Fr, N, H, d)
    for f in range(Fr):
        idx = keep[f].nonzero().squeeze(1)
        if idx.numel() == 0:
            assert out_full[f].abs().max() == 0
            continue
        ref = dense_attention(q[f, idx][None], k[f, idx][None], v[f, idx][None])[0]
        assert (out_full[f, idx] - ref).abs().max() < 1e-5


def test_causal_varlen_matches_per_sequence():
    torch.manual_seed(0)
    lengths = [5, 9, 9, 3]
    q, k = torch.randn(sum(lengths), 4, 8), torch.randn(sum(lengths), 2, 8)
    v = torch.randn(sum(lengths), 2, 8)
    outs = {b: varlen_attention(q, k, v, VarlenPlan.build(lengths, q.device, True, b)) for b in ["bucketed", "padded", "block_diag"]}
    start = 0
    for n in lengths:
        ref = dense_attention(q[start:start + n][None], k[start:start + n][None], v[start:start + n][None], causal=True)[0]
        for b, o in outs.items():
            assert (o[start:start + n] - ref).abs().max() < 1e-5, b
        start += n


def test_group_patches_pads_grid_and_masks():
    x = torch.arange(1 * 25 * 1, dtype=torch.float32).view(1, 25, 1)     # 5x5 grid, g=2 -> 3x3 groups
    groups, valid = group_patches(x, 5, 2)
    assert groups.shape == (1, 9, 4, 1)
    assert groups[0, 0, :, 0].tolist() == [0, 1, 5, 6]
    assert valid[8].tolist() == [True, False, False, False]               # bottom-right corner group
    up = ungroup_mask(torch.arange(9.0).view(1, 9), 5, 2)
    assert up.view(5, 5)[4].tolist() == [6, 6, 7, 7, 8]


def test_budget_formula_and_first_frame_kept():
    layout = FrameLayout([8, 5, 1, 0], [True, True, False, False])
    G, r = 9, 0.5
    scores = torch.rand(layout.num_frames, G)
    scores[0] = 0.0                                                         # first frame scored lowest: still kept
    keep = select_groups(_budget("scorer", G, r), layout, scores=scores)
    for s, T, vid in zip(layout.starts, layout.lengths, layout.is_video):
        if T == 0:
            continue
        kv = keep[s:s + T]
        assert int((~kv).sum()) == pruned_groups(G, T, r, vid)
        assert int(kv.sum()) == llm_visual_tokens(G, T, r, vid)
        assert bool(kv[0].all())
    assert pruned_groups(9, 8, 0.5) == 36 and pruned_groups(9, 5, 0.5) == 22 and pruned_groups(9, 1, 0.5) == 0


def test_scorer_keeps_the_highest_scores():
    layout = FrameLayout([3], [True])
    scores = torch.tensor([[0.1, 0.2], [0.9, 0.3], [0.8, 0.05]])
    keep = select_groups(_budget("scorer", 2, 0.5), layout, scores=scores)   # int(2*.5*3)=3 pruned
    assert keep.tolist() == [[True, True], [True, False], [False, False]]


@pytest.mark.parametrize("method", ["random", "uniform", "temporal_diff", "scorer"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_every_baseline_prunes_the_same_budget(method, ratio):
    layout = FrameLayout([8, 6, 16], [True, True, True])
    G = 9
    x = torch.rand(layout.num_frames, G)
    keep = select_groups(_budget(method, G, ratio), layout, scores=x, novelty=x,
                         generator=torch.Generator().manual_seed(0))
    for s, T in zip(layout.starts, layout.lengths):
        assert int((~keep[s:s + T]).sum()) == int(G * ratio * T)
        assert bool(keep[s].all())


def test_uniform_drops_whole_frames_evenly():
    layout = FrameLayout([8], [True])
    keep = select_groups(_budget("uniform", 4, 0.5), layout, generator=None)  # 16 groups = 4 whole frames
    assert keep.all(1).tolist() == [True, False, True, False, True, False, True, False]


def test_none_prunes_nothing():
    layout = FrameLayout([8], [True])
    assert bool(select_groups(_budget("none", 4, 0.5), layout).all())


# ---------------------------------------------------------------------------------------------
# TokenBudget: every count of one setting, from metadata alone

def test_token_budget_counts_by_hand():
    b = _budget("scorer", 16, 0.8)
    assert b.pruned_groups(8) == 102 and b.llm_visual_tokens(8) == 26      # int(16*0.8*8) = int(102.4)
    assert b.with_setting("scorer", 0.5).llm_visual_tokens(8) == 64        # 128 - 64
    assert b.with_setting("none", 0.8).llm_visual_tokens(8) == 128         # none keeps everything
    assert b.pruned_groups(1) == 0 and b.llm_visual_tokens(1) == 16        # a single frame is never pruned
    assert b.pruned_groups(8, is_video=False) == 0                         # nor is an image
    assert b.prompt_visual_span(8) == 26                                   # no separators
    with_sep = _budget("scorer", 16, 0.8, frame_separators=True)
    assert with_sep.prompt_visual_span(8) == 26 + 8 and with_sep.prompt_visual_span(1) == 16 + 1
    assert with_sep.separator_tokens(torch.tensor([3, 0]).numpy()).tolist() == [3, 0]
    with pytest.raises(ValueError, match="first frame"):
        _budget("scorer", 16, 0.8).llm_visual_tokens(4)                    # int(51.2) = 51 > 16*3


def test_token_budget_method_none_prunes_nothing_whatever_the_ratio():
    none = _budget("none", 16, 0.8)
    assert none.prune_ratio == 0.0 and none.pruned_groups(8) == 0
    assert _budget("random", 16, 0.5).with_setting("none", 0.5).prune_ratio == 0.0


def test_with_setting_keeps_geometry_and_prompt_layout():
    b = _budget("scorer", 16, 0.5, frame_separators=True, adaptive_strength=1.0)
    s = b.with_setting("random", 0.8)
    assert (s.method, s.prune_ratio, s.adaptive_strength) == ("random", 0.8, None)    # fixed unless given
    assert (s.groups_per_frame, s.patches_per_frame, s.frame_separators) == (16, 64, True)
    assert b.with_setting("scorer", 0.5, b.adaptive_strength) == b
    with pytest.raises(AttributeError):
        b.prune_ratio = 0.3                                                 # frozen: one copy, never edited


def test_token_budget_from_model_config():
    from types import SimpleNamespace as NS
    cfg = NS(vit=NS(image_size=64, patch_size=8), connector=NS(pool_size=3),
             stts=NS(method="temporal_diff", prune_ratio=0.5, frame_separators=True, adaptive=False,
                     adaptive_strength=2.0))
    b = TokenBudget.from_model_config(cfg)                                  # 8x8 patches -> 3x3 groups
    assert b == TokenBudget("temporal_diff", 0.5, 9, 64, True, None)
    cfg.stts.adaptive = True
    assert TokenBudget.from_model_config(cfg).adaptive_strength == 2.0


def test_too_short_to_prune_matches_the_scalar_rule():
    import numpy as np
    b = _budget("scorer", 16, 0.8)
    frames, is_video = np.array([8, 4, 5, 1, 4]), np.array([True, True, True, True, False])
    expected = []
    for t, v in zip(frames.tolist(), is_video.tolist()):
        try:
            b.pruned_groups(t, v)
            expected.append(False)
        except ValueError:
            expected.append(True)
    assert b.too_short_to_prune(frames, is_video).tolist() == expected == [False, True, False, False, False]


def test_pairing_never_crosses_videos():
    torch.manual_seed(0)
    scorer = TokenScorer(width=8, hidden=16, heads=2, pool_size=2)
    x = torch.randn(5, 16, 8)                                                # 4x4 grid -> 4 groups
    both = scorer(x, 4, FrameLayout([3, 2], [True, True]))
    first_only = scorer(x[:3], 4, FrameLayout([3], [True]))
    second_only = scorer(x[3:], 4, FrameLayout([2], [True]))
    assert torch.allclose(both[:3], first_only, atol=1e-6)
    assert torch.allclose(both[3:], second_only, atol=1e-6)                  # frame 3 is NOT paired with frame 2


def test_temporal_target_is_one_minus_cosine_by_hand():
    layout = FrameLayout([2, 1], [True, False])
    v = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]], [[0.0, 1.0]]])              # (F=3, G=1, 2)
    nov = temporal_novelty(v, layout)
    assert nov[0, 0] == 0 and nov[2, 0] == 0                                  # first frame, image
    assert math.isclose(float(nov[1, 0]), 1 - 1 / math.sqrt(2), rel_tol=1e-6)
    s = torch.tensor([[0.5], [0.2], [0.9]])
    loss = temporal_novelty_loss(s, v, layout)
    assert math.isclose(float(loss), (0.2 - (1 - 1 / math.sqrt(2))) ** 2, rel_tol=1e-6)


def test_key_bias_rescale():
    layout = FrameLayout([2], [True])
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.2, 0.6, 0.4, 1.0]])
    bias = key_bias_from_scores(scores, 4, 2, layout, -2.0)                  # 4x4 grid, g=2
    assert bias.shape == (2, 16)
    assert torch.all(bias[0] == 0)                                            # first frame forced to 1
    assert math.isclose(float(bias[1].min()), -2.0, rel_tol=1e-5)
    assert math.isclose(float(bias[1].max()), 0.0, abs_tol=1e-6)
