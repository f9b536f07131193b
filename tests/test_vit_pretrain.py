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


def test_evaluate_counts_correct_digits():
    from stts_dist.train.vit_pretrain import digit_frames, evaluate
    frames, target = digit_frames(40, 1, 32, split="eval")
    truth = torch.from_numpy(target)

    class Oracle(torch.nn.Module):   # answers right for the first 30 frames, class 0 for the rest
        def forward(self, x):
            n = x.shape[0]
            out = truth[self.start:self.start + n].clone()
            out[max(0, 30 - self.start):] = torch.nn.functional.one_hot(torch.zeros(n, dtype=torch.long), 10)[max(0, 30 - self.start):].float()
            self.start += n
            return out

    oracle = Oracle()
    oracle.start = 0
    wrong_zero = sum(1 for t in target[30:] if t.argmax() != 0)
    assert evaluate(oracle, frames, target, batch=16)["top1_acc"] == (40 - wrong_zero) / 40


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
    with pytest.raises(TimeoutError, match="did not finish"):
        ensure_digits_vit(other, is_rank0=False, timeout_s=0.5)
    # off by default; an explicit vit_path wins
    off = load_config(None, tiny_overrides(**{"data.work_dir": str(tmp_path)}))
    ensure_digits_vit(off, is_rank0=True)
    assert off.model.pretrained.vit_path == ""
