"""stts-eval, stts-infer, checkpoint loading, kept-token pictures and adaptive budgets.

Checkpoints are real: a tiny model trained for two steps with the Trainer (and one saved
untrained, for the chance-level check). Tiny model: 32 px frames, 8 px patches (4x4 grid),
pool 2 -> G = 4 groups per frame; 4 frames -> 16 LLM visual tokens unpruned.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_overrides
from dist_utils import run_distributed

G, T = 4, 4
QUESTION = "how many digits are shown ?"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: with 2 intra-op threads on a busy 2-core host they run ~50x slower (the
    threads spin waiting for each other), with 1 they take milliseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trainer(out_dir: Path, steps: int):
    from stts_dist.config import load_config
    from stts_dist.train.trainer import Trainer

    cfg = load_config(None, tiny_overrides(**{"train.steps": steps, "train.out_dir": str(out_dir),
                                              "train.eval_prune_ratios": "[0.0]", "data.eval_samples": 2}))
    return Trainer(cfg, callbacks=[])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    _trainer(out, steps=2).fit()
    return out


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("untrained")
    _trainer(out, steps=0).save()  # random weights, step 0
    return out


def _clip(path: Path, num_frames: int = 8, width: int = 64, height: int = 32) -> Path:
    """A wide clip: red side bands, a grey centre whose level encodes the frame index."""
    from data_pipeline.synth_digits import write_mp4

    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    side = (width - height) // 2
    frames[:, :, :side] = frames[:, :, width - side:] = (255, 0, 0)
    for k in range(num_frames):
        frames[k, :, side:width - side] = (20 + 25 * k) % 250
    write_mp4(path, frames, fps=4.0)
    return path


def _eval(run: Path, out: Path, *extra: str) -> dict:
    from stts_dist.eval.cli import run_eval
    return run_eval(["--checkpoint", str(run), "--out", str(out), "--quiet", *extra])


def _rig_generation(monkeypatch, correct_tasks):
    """Generation that answers right exactly for samples of ``correct_tasks`` (the model still
    runs, so token counts and timings are real); the metric must then follow."""
    import stts_dist.infer as infer
    from stts_dist.tokenizer import default_tokenizer

    tok, real = default_tokenizer(), infer.generate

    def rigged(model, batch, *args, **kwargs):
        ids, info = real(model, batch, *args, **kwargs)
        ids = [tok.encode(ans) if task in correct_tasks else [tok.stoi["left"]]
               for ans, task in zip(batch.answers, batch.tasks)]
        return ids, info

    monkeypatch.setattr(infer, "generate", rigged)


def _digits_tasks(n: int) -> list[str]:
    from stts_dist.data.digits import make_sample
    return [make_sample(i, 0, T, 32, ["count", "last", "direction", "corner"], split="eval")["task"] for i in range(n)]


# --------------------------------------------------------------------------------------------- stts-eval
@pytest.mark.slow
def test_eval_writes_table_json_csv_png_and_mlflow(trained_run, tmp_path, capsys):
    out = tmp_path / "eval"
    store = tmp_path / "mlflow"
    rep = _eval(trained_run, out, "--methods", "scorer,random,none", "--ratios", "0,0.5,0.75,0.9", "--samples", "6",
                "--batch-size", "6", "--tts-factor", "2", "--mlflow-uri", f"sqlite:///{store}.db",
                "--mlflow-artifact-location", str(store / "art"))
    labels = [r["setting"] for r in rep["rows"]]
    assert labels == ["none@0", "scorer@0.5", "scorer@0.75", "random@0.5", "random@0.75",
                      "scorer@0.5 tts 8f", "random@0.5 tts 8f"]
    by = {r["setting"]: r for r in rep["rows"]}
    # kept = G*T - int(G*r*T); test-time scaling: 2x frames at the unpruned 1x budget
    assert [by[k]["llm_visual_tokens"] for k in labels] == [16, 8, 4, 8, 4, 16, 16]
    assert by["scorer@0.5 tts 8f"]["frames"] == 8 and by["scorer@0.5 tts 8f"]["vit_patches"] == 8 * 16
    assert by["scorer@0.5"]["vit_patches_kept"] == 8 * 4  # each kept group = 2x2 patches
    assert all(r["n"] == 6 and r["batches"] == 1 and r["prefill_ms"] > 0 for r in rep["rows"])
    assert by["none@0"]["speedup"] == 1.0
    assert any(n.startswith("scorer@0.9 skipped: it would prune 14 of 16") for n in rep["notes"])
    saved = json.loads((out / "results.json").read_text())
    assert [r["setting"] for r in saved["rows"]] == labels
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["setting"] for r in rows] == labels and float(rows[1]["llm_visual_tokens"]) == 8.0
    assert {"acc/count", "acc/last", "prefill_ms", "speedup"} <= set(rows[0])
    # digits clips carry object annotations: every row says what it kept of the digits
    assert {"obj_recall", "obj_precision", "obj_coverage_frame", "frame_coverage", "kept_first_frame"} <= set(rows[0])
    assert by["none@0"]["obj_recall"] == 1.0 and by["none@0"]["frame_coverage"] == 1.0
    assert by["scorer@0.5"]["kept_first_frame"] == 4 and by["scorer@0.5"]["kept_later_frames"] == 4
    assert 0 < by["random@0.5"]["obj_recall"] < 1
    # r=0.75 keeps 4 of 16 groups: exactly the protected first frame, so nothing later
    assert by["random@0.75"]["obj_recall"] == 0 and by["random@0.75"]["kept_later_frames"] == 0
    with Image.open(out / "accuracy_vs_tokens.png") as img:   # accuracy panel + object-recall panel
        assert img.format == "PNG" and img.size == (1150, 440)
    from mlflow import MlflowClient
    run = MlflowClient(f"sqlite:///{store}.db").get_run(rep["mlflow_run_id"])
    assert run.data.metrics["scorer_0.5/llm_visual_tokens"] == 8.0
    assert "none_0/acc" in run.data.metrics


@pytest.mark.slow
def test_accuracy_follows_the_answers(trained_run, tmp_path, monkeypatch):
    _rig_generation(monkeypatch, {"count", "last", "direction", "corner"})
    perfect = _eval(trained_run, tmp_path / "a", "--methods", "none", "--ratios", "0", "--samples", "12",
                    "--tts-factor", "0")["rows"][0]
    assert perfect["acc"] == 1.0 and perfect["n"] == 12
    _rig_generation(monkeypatch, {"count"})
    rep = _eval(trained_run, tmp_path / "b", "--methods", "none", "--ratios", "0", "--samples", "12",
                "--tts-factor", "0")
    row = rep["rows"][0]
    tasks = _digits_tasks(12)
    assert row["acc/count"] == 1.0
    assert all(row[f"acc/{t}"] == 0.0 for t in set(tasks) - {"count"})
    assert row["acc"] == pytest.approx(tasks.count("count") / 12)


def test_untrained_model_is_near_chance(untrained_run, tmp_path):
    row = _eval(untrained_run, tmp_path, "--methods", "none", "--ratios", "0", "--samples", "24",
                "--tts-factor", "0")["rows"][0]
    # Chance: 1/10 for the digit tasks, 1/3 for count; random weights emit no consistent answer.
    assert row["n"] == 24 and row["acc"] <= 0.25


def _dist_eval_body(rank: int, world: int, run: str, out: str) -> dict:
    import pytest as _pytest
    mp = _pytest.MonkeyPatch()
    _rig_generation(mp, {"direction"})
    return _eval(Path(run), Path(out), "--methods", "random", "--ratios", "0.5", "--samples", "7",
                 "--batch-size", "2", "--tts-factor", "0")


@pytest.mark.slow
def test_data_parallel_eval_equals_single_process(trained_run, tmp_path, monkeypatch):
    two = run_distributed(_dist_eval_body, 2, str(trained_run), str(tmp_path / "dp"))
    _rig_generation(monkeypatch, {"direction"})
    one = _eval(trained_run, tmp_path / "single", "--methods", "random", "--ratios", "0.5", "--samples", "7",
                "--batch-size", "2", "--tts-factor", "0")
    keys = ["setting", "n", "acc", "acc/count", "acc/last", "acc/direction", "acc/corner", "llm_visual_tokens",
            "vit_patches_kept"]
    for r2, r1 in zip(two[0]["rows"], one["rows"]):
        assert {k: r2[k] for k in keys} == pytest.approx({k: r1[k] for k in keys}, nan_ok=True)
    assert one["rows"][0]["acc"] == pytest.approx(_digits_tasks(7).count("direction") / 7)
    assert json.dumps(two[0]["rows"]) == json.dumps(two[1]["rows"]) and two[0]["world_size"] == 2
    assert (tmp_path / "dp" / "results.json").is_file()


def test_eval_on_a_manifest_of_mp4_files(trained_run, tmp_path, monkeypatch):
    from data_pipeline.synth_digits import write_synthetic
    manifest = write_synthetic(tmp_path / "synth", 3, frames=8, image_size=32, seed=1, split="eval")
    _rig_generation(monkeypatch, {"count", "last", "direction", "corner"})  # answers read from the manifest
    rep = _eval(trained_run, tmp_path / "out", "--data", f"manifest:{manifest}", "--methods", "uniform",
                "--ratios", "0.5", "--frames", "4", "--tts-factor", "2")
    rows = {r["setting"]: r for r in rep["rows"]}
    assert set(rows) == {"none@0", "uniform@0.5", "uniform@0.5 tts 8f"} and rep["notes"] == []
    assert all(r["acc"] == 1.0 and r["n"] == 3 for r in rows.values())
    assert rows["uniform@0.5 tts 8f"]["frames_mean"] == 8 and rows["uniform@0.5 tts 8f"]["llm_visual_tokens"] == 16
    assert rows["uniform@0.5"]["frames_mean"] == 4 and rows["uniform@0.5"]["llm_visual_tokens"] == 8


def test_ratio_for_budget_is_exact():
    from stts_dist.eval.settings import ratio_for_budget
    from stts_dist.stts.budget import llm_visual_tokens
    for g in (1, 4, 9, 81, 729):
        for t in (2, 3, 7, 16, 64):
            for k in (1.5, 2, 3, 4):
                frames = int(round(k * t))
                r = ratio_for_budget(g, frames, g * t)
                assert llm_visual_tokens(g, frames, r) == g * t


# --------------------------------------------------------------------------------------------- stts-infer
def test_frames_are_sampled_uniformly_and_center_cropped(tmp_path):
    from stts_dist.infer import load_video_frames
    frames = load_video_frames(_clip(tmp_path / "c.mp4", num_frames=8), 4, 32)
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    levels = frames[:, 4:-4, 4:-4].reshape(4, -1, 3).mean(1)
    # window centres of 8 frames -> frames 1, 3, 5, 7; grey (no red side band inside the crop)
    assert np.allclose(levels, [[20 + 25 * k] * 3 for k in (1, 3, 5, 7)], atol=6)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_infer_answers_a_batch_and_keeps_the_formula_count(trained_run, tmp_path, ratio, capsys):
    from stts_dist.infer import run
    a, b = _clip(tmp_path / "a.mp4"), _clip(tmp_path / "b.mp4", num_frames=12)
    args = ["--checkpoint", str(trained_run), "--question", QUESTION, "--prune-ratio", str(ratio),
            "--frames", str(T), "--method", "scorer"]
    both = run(args + ["--video", str(a), "--video", str(b), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert [x["llm_tokens"] for x in doc["answers"]] == [G * T - int(G * ratio * T)] * 2
    for ans in both:
        assert isinstance(ans.answer, str) and ans.frames == T and ans.batch_size == 2
        assert ans.llm_tokens == G * T - int(G * ratio * T) == int(ans.keep.sum())
        assert ans.vit_patches == T * 16 and ans.vit_patches_kept == 4 * ans.llm_tokens and ans.prefill_s > 0
    alone = run(args + ["--video", str(a)])
    assert alone[0].answer == both[0].answer and torch.equal(alone[0].keep, both[0].keep)
    assert "LLM visual tokens 16 -> " in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- pictures
def _load_tool():
    spec = importlib.util.spec_from_file_location("visualize_tokens",
                                                  Path(__file__).resolve().parents[2] / "tools" / "visualize_tokens.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_visualization_size_and_methods_differ(trained_run, tmp_path):
    from stts_dist.visualize import CELL, HEADER_H, picture_size
    tool = _load_tool()
    clip = _clip(tmp_path / "v.mp4")
    paths = tool.run(["--checkpoint", str(trained_run), "--video", str(clip), "--method", "scorer,uniform,random",
                      "--prune-ratio", "0.5", "--out", str(tmp_path / "kept.png"), "--gif", str(tmp_path / "k.gif")])
    by = {p.name: p for p in paths}
    imgs = {m: np.asarray(Image.open(by[f"kept_{m}.png"]).convert("RGB")) for m in ("scorer", "uniform", "random")}
    assert imgs["scorer"].shape[:2][::-1] == picture_size(T, True, CELL)   # with the score heat map
    assert imgs["uniform"].shape[:2][::-1] == picture_size(T, False, CELL)
    assert imgs["uniform"].shape == imgs["random"].shape
    assert not np.array_equal(imgs["uniform"][HEADER_H:], imgs["random"][HEADER_H:])  # below the titles
    with Image.open(by["kept.png"]) as stacked:
        assert stacked.height == sum(i.shape[0] for i in imgs.values())
    with Image.open(tmp_path / "k.gif") as gif:
        assert gif.n_frames == T


def test_infer_visualize_and_trainer_snapshot(trained_run, tmp_path):
    from stts_dist.checkpoint_io import load_checkpoint
    from stts_dist.data.digits import make_sample
    from stts_dist.infer import run
    from stts_dist.visualize import picture_size, snapshot_for_trainer

    run(["--checkpoint", str(trained_run), "--video", str(_clip(tmp_path / "a.mp4")), "--question", QUESTION,
         "--method", "random", "--prune-ratio", "0.5", "--visualize", str(tmp_path / "pic.png")])
    with Image.open(tmp_path / "pic.png") as img:
        assert img.size == picture_size(T, False)
    _, _, model = load_checkpoint(trained_run)
    model.train()
    sample = make_sample(0, 0, T, 32, ["count"], split="eval")
    path = snapshot_for_trainer(model, sample, tmp_path, step=5, budget=model.budget.with_setting("scorer", 0.5))
    assert path == tmp_path / "kept_tokens" / "step_00000005.png" and path.is_file() and model.training
    assert snapshot_for_trainer(model, sample, tmp_path / "r1", step=5, write=False) is None


# --------------------------------------------------------------------------------------------- bad input
def test_missing_and_empty_checkpoint_paths(tmp_path):
    from stts_dist.eval import main as eval_main
    from stts_dist.infer import main as infer_main
    with pytest.raises(SystemExit, match="checkpoint not found: .*nope does not exist"):
        eval_main(["--checkpoint", str(tmp_path / "nope")])
    (tmp_path / "run" / "checkpoints" / "step_00000001").mkdir(parents=True)  # partial: no manifest
    with pytest.raises(SystemExit, match="no complete checkpoint under .*1 incomplete"):
        infer_main(["--checkpoint", str(tmp_path / "run"), "--video", "x.mp4", "--question", "q"])


def test_config_weights_mismatch_names_the_tensor(trained_run, tmp_path):
    from stts_dist.checkpoint_io import CheckpointLoadError, load_checkpoint, resolve_checkpoint_dir
    from stts_dist import checkpoint as ckpt

    src = resolve_checkpoint_dir(trained_run)
    config = (src / "config.yaml").read_text().replace("ffn: 64", "ffn: 96")
    assert config != (src / "config.yaml").read_text()

    def write(tmp: Path) -> None:
        shutil.copy(src / "state.pt", tmp / "state.pt")
        shutil.copy(src / "tokenizer.json", tmp / "tokenizer.json")
        (tmp / "config.yaml").write_text(config)

    ckpt.write_checkpoint(tmp_path / "checkpoints", 1, write, {})
    with pytest.raises(CheckpointLoadError, match=r"shape mismatch: llm\.\S+ is \(\d+(, \d+)?\) in the weights"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointLoadError, match="shape mismatch"):
        load_checkpoint(trained_run, overrides=["model.vit.width=64"])
    tampered = tmp_path / "tampered"
    shutil.copytree(src, tampered)
    (tampered / "config.yaml").write_text(config)
    with pytest.raises(CheckpointLoadError, match="config.yaml fails its checksum"):
        load_checkpoint(tampered)


def test_unreadable_video_and_empty_question(trained_run, tmp_path):
    from stts_dist.infer import main
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 50)
    with pytest.raises(SystemExit, match=r"cannot read video .*bad\.mp4"):
        main(["--checkpoint", str(trained_run), "--video", str(bad), "--question", QUESTION])
    with pytest.raises(SystemExit, match="question for .* is empty"):
        main(["--checkpoint", str(trained_run), "--video", str(bad), "--question", "  "])
    with pytest.raises(SystemExit, match="2 --video but 3 --question"):
        main(["--checkpoint", str(trained_run), "--video", "a", "--video", "b", "--question", "x", "--question", "y",
              "--question", "z"])


def test_eval_adaptive_rows_keep_the_mean_budget_and_vary_per_video(trained_run, tmp_path):
    rep = _eval(trained_run, tmp_path / "eval", "--methods", "scorer", "--ratios", "0.5", "--samples", "8",
                "--batch-size", "8", "--tts-factor", "0", "--adaptive", "1")
    by = {r["setting"]: r for r in rep["rows"]}
    assert list(by) == ["none@0", "scorer@0.5", "scorer@0.5 adaptive"]
    # the batch's total budget is the fixed rule's: the mean over videos stays G*T - int(G*r*T)
    assert by["scorer@0.5 adaptive"]["llm_visual_tokens"] == by["scorer@0.5"]["llm_visual_tokens"] == 8
    assert by["scorer@0.5 adaptive"]["kind"] == "adaptive" and by["scorer@0.5 adaptive"]["n"] == 8
    from stts_dist.data.batch import SequenceBuilder
    from stts_dist.data.digits import make_sample
    from stts_dist.stts.budget import TokenBudget
    from stts_dist.tokenizer import default_tokenizer
    samples = [make_sample(i, 0, T, 32, ["count", "last", "direction", "corner"], split="eval") for i in range(8)]
    budget = TokenBudget("scorer", 0.5, G, 16, frame_separators=False, adaptive_strength=1.0)
    kept = SequenceBuilder(default_tokenizer(), budget, 32)(samples, with_answer=False).visual_tokens
    assert sum(kept) == 8 * 8 and len(set(kept)) > 1   # per-video budgets differ, the total does not
    with pytest.raises(SystemExit, match="--adaptive -1.0 must be >= 0"):
        from stts_dist.eval import main
        main(["--checkpoint", str(trained_run), "--adaptive", "-1"])


def test_eval_rejects_bad_options(trained_run):
    from stts_dist.eval import main
    with pytest.raises(SystemExit, match="unknown \\['tome'\\]"):
        main(["--checkpoint", str(trained_run), "--methods", "scorer,tome"])
    with pytest.raises(SystemExit, match="--ratios entry 1.5 must be in"):
        main(["--checkpoint", str(trained_run), "--ratios", "0,1.5"])
    with pytest.raises(SystemExit, match="--data 'webvid' must be digits, shards:DIR"):
        main(["--checkpoint", str(trained_run), "--data", "webvid"])


# --------------------------------------------------------------------------------------------- adaptive budgets
def test_adaptive_budgets_keep_the_total_and_order_by_novelty():
    from stts_dist.stts.adaptive import adaptive_budgets
    from stts_dist.stts.budget import pruned_groups
    nov = [0.0, 0.02, 0.05, 0.1, 0.3]
    frames = [8, 8, 16, 8, 4]
    for r in (0.3, 0.5, 0.7):
        p = adaptive_budgets(nov, frames, 9, r)
        assert sum(p) == sum(pruned_groups(9, t, r) for t in frames)
        assert all(0 <= x <= 9 * (t - 1) for x, t in zip(p, frames))
        ratios = [x / (9 * t) for x, t in zip(p, frames)]
        assert ratios == sorted(ratios, reverse=True)  # static pruned most, busiest least
    assert adaptive_budgets(nov, frames, 9, 0.5)[0] == 9 * 7  # a still video keeps its first frame only


def test_adaptive_budgets_special_cases():
    from stts_dist.stts.adaptive import adaptive_budgets, pixel_novelty
    from stts_dist.stts.budget import pruned_groups
    frames = [8, 4, 1, 16]
    fixed = [pruned_groups(9, t, 0.7, t > 1) for t in frames]
    assert adaptive_budgets([0.1, 0.3, 0.0, 0.2], frames, 9, 0.7, strength=0) == fixed
    assert adaptive_budgets([0.0] * 4, frames, 9, 0.7) == fixed        # no content signal: fixed rule
    p = adaptive_budgets([0.0, 1.0, 0.5], 8, 9, 0.5, min_ratio=0.25, max_ratio=0.75)
    assert sum(p) == 3 * 36 and all(18 <= x <= 54 for x in p)
    with pytest.raises(ValueError, match="first frame is always kept"):
        adaptive_budgets([0.1], 2, 9, 0.9)
    still = np.zeros((4, 8, 8, 3), np.uint8)
    flicker = np.stack([np.full((8, 8, 3), 255 * (k % 2), np.uint8) for k in range(4)])
    assert pixel_novelty(still) == 0.0 and pixel_novelty(flicker) == 1.0 and pixel_novelty(still[:1]) == 0.0
