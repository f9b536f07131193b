"""tools/probe_binding.py: the linear probes score what a feature really says, on known features."""
import torch
from conftest import load_tool


def _tool():
    return load_tool("probe_binding")


def test_linear_probe_reads_a_linear_label_and_not_noise():
    probe = _tool().linear_probe
    g = torch.Generator().manual_seed(0)
    y = torch.arange(600) % 3                                    # 3 balanced classes
    train = torch.arange(600) < 400
    coded = torch.nn.functional.one_hot(y, 3).float() * 2 + 0.1 * torch.randn(600, 3, generator=g)
    X = torch.cat([coded, torch.randn(600, 5, generator=g)], dim=1)
    assert probe(X, y, train) == {"acc": 1.0, "majority": 0.33, "n_test": 200}   # 66 of 200 test labels are class 0, the train majority
    noise = torch.randn(600, 8, generator=g)
    assert probe(noise, y, train)["acc"] < 0.45                  # chance 1/3
    unlabelled = y.clone()
    unlabelled[::2] = -1                                         # -1: no label, left out of fit and score
    assert probe(X, unlabelled, train)["n_test"] == 100


def test_stage0_probes_find_the_position_code_of_a_fresh_vit(tmp_path):
    """Block by block on an exported ViT: a sin-cos position start is fully readable from the patch
    embeddings (row), and every block gets a row and a digit score."""
    from stts_dist.model.vit import VideoViT
    from stts_dist.weights.hf_vit import export_hf_vit
    torch.manual_seed(0)
    export_hf_vit(VideoViT(32, 8, 32, 2, 2, 64, pos_embed_init="sincos"), tmp_path / "vit")
    out = _tool().stage0_layer_probes(str(tmp_path / "vit"), clips=9)
    assert list(out) == ["stage0", "embed", "block1", "block2"]
    assert out["embed"]["row"] >= 0.95                         # 4 rows: majority 0.25
    assert all(0.0 <= v[k] <= 1.0 for v in list(out.values())[1:] for k in ("row", "digit"))
