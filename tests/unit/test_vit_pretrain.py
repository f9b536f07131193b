"""Stage 0 (ViT digit pre-training): its frames, its training loop and its SigLIP-format output,
which ``model.pretrained.vit_path`` loads into the VLM."""
import json

import numpy as np
import pytest
import torch

from conftest import tiny_overrides


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_digit_frames_are_deterministic_multi_hot_and_drawn_like_the_clips():
    from stts_dist.train.vit_pretrain import digit_frames
    a, ya = digit_frames(12, 3, 32, max_digits=3)
    b, yb = digit_frames(12, 3, 32, max_digits=3)
    assert a.shape == (12, 32, 32, 3) and a.dtype == np.uint8 and ya.shape == (12, 10)
    assert np.array_equal(a, b) and np.array_equal(ya, yb)
    assert set(ya.sum(1).tolist()) <= {1.0, 2.0, 3.0} and len(set(ya.sum(1).tolist())) > 1
    c, yc = digit_frames(12, 3, 32, split="eval", max_digits=3)
    one_hot = digit_frames(12, 3, 32)[1]                     # the pre-training default: one digit
    assert (one_hot.sum(1) == 1).all()
    assert not np.array_equal(a, c)
    # a digit is brighter than the background everywhere it is drawn: frames with more digits are brighter
    one = digit_frames(64, 0, 32)[0].mean()
    three = digit_frames(64, 0, 32, max_digits=3)[0].mean()
    assert three > one


@pytest.mark.slow
def test_pretrain_runs_and_exports_a_vit_the_trainer_loads(tmp_path):
    from stts_dist.config import load_config
    from stts_dist.train.trainer import Trainer
    from stts_dist.train.vit_pretrain import main, pretrain

    cfg = load_config(None, tiny_overrides())
    vit, report = pretrain(cfg.model.vit, steps=30, batch_size=16, lr=3e-3, seed=0, eval_frames=64, log=lambda *_: None)
    # 30 steps only check the loop runs on real labels (learning to read takes thousands of steps:
    # docs/benchmarks.md): accuracy is a fraction of 64 held-out frames
    acc = report["after"]["top1_acc"]
    assert 0.0 <= acc <= 1.0 and abs(acc * 64 - round(acc * 64)) < 1e-9
    out = tmp_path / "vit"
    assert main(["--out", str(out), "--steps", "2", "--batch-size", "4", "--config", "jobs/default.yaml",
                 *tiny_overrides()]) == 0
    saved = json.loads((out / "pretrain_report.json").read_text())
    assert saved["steps"] == 2 and {"before", "after", "seconds"} <= set(saved)
    trainer = Trainer(load_config(None, tiny_overrides(**{"model.pretrained.vit_path": str(out),
                                                          "train.out_dir": str(tmp_path / "run")})), callbacks=[])
    from safetensors.torch import load_file
    want = load_file(str(out / "model.safetensors"))["vision_model.encoder.layers.0.mlp.fc1.weight"]
    vit_loaded = trainer.model.vit.blocks[0].mlp.fc1.weight
    assert torch.equal(vit_loaded.detach().cpu(), want)


def test_pretrain_rejects_bad_options(tmp_path):
    from stts_dist.train.vit_pretrain import main
    with pytest.raises(SystemExit, match="--steps and --batch-size must be >= 1"):
        main(["--config", "jobs/default.yaml", "--out", str(tmp_path / "x"), "--steps", "0"])
    with pytest.raises(SystemExit, match="unknown|model.vit.widht"):
        main(["--config", "jobs/default.yaml", "--out", str(tmp_path / "x"), "model.vit.widht=3"])


def test_evaluate_counts_correct_digits_and_ink_patches():
    from stts_dist.train.vit_pretrain import BACKGROUND, digit_frames, evaluate
    frames, target, patch_labels = digit_frames(40, 1, 64, split="eval", patch_size=8)   # every digit inks a patch
    truth = torch.from_numpy(target)
    patch_truth = 10 * torch.nn.functional.one_hot(torch.from_numpy(patch_labels), 11).float()

    class Oracle(torch.nn.Module):   # right for the first 30 frames, class 0 for the rest (frame and patches)
        def forward(self, x):
            n = x.shape[0]
            out, patches = truth[self.start:self.start + n].clone(), patch_truth[self.start:self.start + n].clone()
            wrong = slice(max(0, 30 - self.start), None)
            out[wrong] = torch.nn.functional.one_hot(torch.zeros(n, dtype=torch.long), 10)[wrong].float()
            patches[wrong] = 10 * torch.nn.functional.one_hot(torch.zeros_like(patches[wrong, :, 0]).long(), 11).float()
            self.start += n
            return out, patches

    for objective in ("frame", "dense"):
        oracle = Oracle()
        oracle.start = 0
        wrong_zero = sum(1 for t in target[30:] if t.argmax() != 0)
        got = evaluate(oracle, frames, target, patch_labels, objective, batch=16)
        assert got["top1_acc"] == (40 - wrong_zero) / 40
        inked = patch_labels != BACKGROUND
        right = inked[:30].sum() + (patch_labels[30:][inked[30:]] == 0).sum()
        assert got["ink_patch_acc"] == pytest.approx(right / inked.sum())


def test_patch_labels_name_the_digit_under_each_patch():
    from stts_dist.train.vit_pretrain import BACKGROUND, MIN_INK_SHARE, digit_frames
    frames, target, labels = digit_frames(30, 2, 64, max_digits=3, style="printed", patch_size=8)
    again = digit_frames(30, 2, 64, max_digits=3, style="printed")
    assert np.array_equal(frames, again[0]) and np.array_equal(target, again[1])   # labels draw nothing extra
    assert labels.shape == (30, 64) and labels.dtype == np.int64
    for y, lab in zip(target, labels):
        named = set(lab[lab != BACKGROUND].tolist())
        assert named <= set(np.flatnonzero(y).tolist()) and named      # only digits in the frame, at least one
        # a ~22 px digit covers a few 8 px patches, never most of the frame
        assert 2 <= (lab != BACKGROUND).sum() <= 24
    # one digit: its patches are where its pixels differ from the background-only frame
    one, y1, lab1 = digit_frames(1, 5, 64, style="printed", patch_size=8)
    digit = int(y1[0].argmax())
    assert set(lab1[0][lab1[0] != BACKGROUND].tolist()) == {digit}
    assert 0 < MIN_INK_SHARE < 0.5


@pytest.mark.slow
def test_dense_objective_trains_the_patch_head_and_is_refused_where_it_cannot_apply():
    from stts_dist.config import ConfigError, load_config
    from stts_dist.train.vit_pretrain import pretrain
    cfg = load_config(None, tiny_overrides())
    _, report = pretrain(cfg.model.vit, steps=20, batch_size=8, lr=3e-3, seed=0, eval_frames=32, log=lambda *_: None,
                         objective="dense", max_digits=3)
    assert report["objective"] == "dense" and report["max_digits"] == 3
    # 20 steps: the patch head has learned "background" at least -- its loss, not the ink accuracy, falls;
    # the accuracies are fractions of the held-out frames / ink patches
    assert 0.0 <= report["after"]["ink_patch_acc"] <= 1.0 and 0.0 <= report["after"]["top1_acc"] <= 1.0
    with pytest.raises(ValueError, match="max_digits must be 1"):
        pretrain(cfg.model.vit, steps=1, batch_size=2, lr=1e-3, seed=0, objective="frame", max_digits=2)
    with pytest.raises(ConfigError, match="digits_vit_objective='pixel' must be one of"):
        load_config(None, tiny_overrides(**{"model.pretrained.digits_vit_objective": "pixel"}))
    with pytest.raises(ConfigError, match="digits_vit_max_digits=2: 1 for the 'frame' objective"):
        load_config(None, tiny_overrides(**{"model.pretrained.digits_vit_max_digits": 2}))


@pytest.mark.slow
def test_stage0_is_trained_once_cached_by_its_settings_and_loaded_by_the_run(tmp_path, capsys):
    from stts_dist.config import load_config
    from stts_dist.train.stage0 import MARKER, ensure_digits_vit, stage0_folder
    from stts_dist.model.vit import VideoViT
    from stts_dist.weights.hf_vit import load_hf_vit

    cfg = load_config(None, tiny_overrides(**{"data.work_dir": str(tmp_path), "data.digit_style": "printed",
                                               "model.pretrained.digits_vit_steps": 3,
                                               "model.pretrained.digits_vit_batch_size": 4}))
    folder = stage0_folder(cfg)
    ensure_digits_vit(cfg, is_rank0=True)
    assert cfg.model.pretrained.vit_path == str(folder) and (folder / MARKER).is_file()
    report = json.loads((folder / MARKER).read_text())
    assert report["steps"] == 3 and report["style"] == "printed"
    assert not list(tmp_path.glob("*.partial-*"))                      # written aside, then renamed
    stamp = (folder / MARKER).stat().st_mtime_ns
    again = load_config(None, tiny_overrides(**{"data.work_dir": str(tmp_path), "data.digit_style": "printed",
                                                 "model.pretrained.digits_vit_steps": 3,
                                                 "model.pretrained.digits_vit_batch_size": 4}))
    ensure_digits_vit(again, is_rank0=True)                             # the cache: no second training
    assert (folder / MARKER).stat().st_mtime_ns == stamp and again.model.pretrained.vit_path == str(folder)
    v = cfg.model.vit
    vit = VideoViT(v.image_size, v.patch_size, v.width, v.depth, v.heads, v.mlp_dim)
    load_hf_vit(vit, folder)                                            # a SigLIP folder the run loads
    # other settings -> another folder; a waiting rank gives up with a message naming the folder
    other = load_config(None, tiny_overrides(**{"data.work_dir": str(tmp_path), "model.pretrained.digits_vit_steps": 4}))
    assert stage0_folder(other) != folder
    dense = load_config(None, tiny_overrides(**{"data.work_dir": str(tmp_path), "data.digit_style": "printed",
                                                 "model.pretrained.digits_vit_steps": 3,
                                                 "model.pretrained.digits_vit_batch_size": 4,
                                                 "model.pretrained.digits_vit_objective": "dense"}))
    assert stage0_folder(dense) not in (folder, stage0_folder(other))
    placed = load_config(None, tiny_overrides(**{"data.work_dir": str(tmp_path), "data.digit_style": "printed",
                                                  "model.pretrained.digits_vit_steps": 3,
                                                  "model.pretrained.digits_vit_batch_size": 4,
                                                  "model.vit.pos_embed_init": "sincos"}))
    assert stage0_folder(placed) not in (folder, stage0_folder(other), stage0_folder(dense))
    with pytest.raises(TimeoutError, match="did not finish"):
        ensure_digits_vit(other, is_rank0=False, timeout_s=0.5)
    # off by default; an explicit vit_path wins
    off = load_config(None, tiny_overrides(**{"data.work_dir": str(tmp_path)}))
    ensure_digits_vit(off, is_rank0=True)
    assert off.model.pretrained.vit_path == ""


def test_sincos_position_init_codes_row_and_column_at_patch_scale():
    """model.vit.pos_embed_init=sincos: MAE's 2-D sin-cos code, first half the row, second half the
    column, scaled by SINCOS_SCALE; "normal" keeps std 0.02; anything else is refused."""
    import math
    from stts_dist.model.vit import SINCOS_SCALE, VideoViT, sincos_2d_position_embedding
    code = sincos_2d_position_embedding(3, 8)                 # quarter = 2: omega = 1, 1/100
    assert code.shape == (9, 8)
    row1_col2 = code[1 * 3 + 2]
    expect = [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01),
              math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]
    assert torch.allclose(row1_col2, torch.tensor(expect), atol=1e-6)
    torch.manual_seed(0)
    vit = VideoViT(24, 8, 8, 1, 2, 16, pos_embed_init="sincos")
    assert torch.equal(vit.pos_embed[0], code * SINCOS_SCALE) and vit.pos_embed.requires_grad
    assert abs(float(VideoViT(64, 8, 128, 1, 4, 64).pos_embed.std()) - 0.02) < 0.003
    with pytest.raises(ValueError, match="pos_embed_init='learned'"):
        VideoViT(24, 8, 8, 1, 2, 16, pos_embed_init="learned")
    with pytest.raises(ValueError, match="divisible by 4"):
        VideoViT(24, 8, 6, 1, 2, 16, pos_embed_init="sincos")
