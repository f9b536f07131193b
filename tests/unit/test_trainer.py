"""Single-process training loop: exact resume, verified checkpoints, preemption, faults."""
import json
import os
import signal
import threading

import pytest

from stts_dist.config import load_config
from stts_dist import checkpoint as ckpt
from stts_dist.train.trainer import InjectedFault, Preempted, Trainer, read_eval_history
from conftest import tiny_overrides


def _cfg(tmp_path, **extra):
    return load_config(None, tiny_overrides(**{"train.out_dir": str(tmp_path / "run"), "train.steps": 6,
                                               "train.eval_prune_ratios": "[0.5]", "data.eval_samples": 4, **extra}))


def _losses(trainer):
    return [h["loss"] for h in trainer.history]


@pytest.mark.slow
def test_resume_reproduces_losses_exactly(tmp_path):
    full = Trainer(_cfg(tmp_path / "a"))
    full.fit()
    first = Trainer(_cfg(tmp_path / "b", **{"train.steps": 3}))
    first.fit()
    resumed = Trainer(_cfg(tmp_path / "b"))
    resumed.fit()
    assert resumed.history[0]["step"] == 4
    assert _losses(first) + _losses(resumed) == _losses(full)          # bit-exact on CPU


def test_corrupt_latest_checkpoint_falls_back(tmp_path, capsys):
    t = Trainer(_cfg(tmp_path, **{"train.save_every": 2}))
    t.fit()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000002", "step_00000004", "step_00000006"]
    state = root / "step_00000006" / "state.pt"
    blob = bytearray(state.read_bytes())
    blob[len(blob) // 2] ^= 0xFF                                          # same size, one flipped byte
    state.write_bytes(bytes(blob))
    found, manifest = ckpt.find_resumable(root)
    assert found.name == "step_00000004" and manifest["step"] == 4
    assert "fails its checksum" in capsys.readouterr().out
    partial = root / "step_00000008"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"half")                           # no manifest: never complete
    assert ckpt.find_resumable(root)[0].name == "step_00000004"


def test_manifest_records_files_and_layout(tmp_path):
    Trainer(_cfg(tmp_path)).fit()
    d = tmp_path / "run" / "checkpoints" / "step_00000006"
    m = json.loads((d / "manifest.json").read_text())
    assert set(m["files"]) == {"state.pt", "config.yaml", "tokenizer.json"}
    assert m["world"] == {"world_size": 1, "tensor_parallel": 1} and m["step"] == 6
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000006"


def test_sigterm_checkpoints_and_resumes(tmp_path):
    cfg = _cfg(tmp_path, **{"train.steps": 50})
    t = Trainer(cfg)
    orig = t.module.train_step

    def step_and_signal(batch, step, gen):
        out = orig(batch, step, gen)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out
    t.module.train_step = step_and_signal
    with pytest.raises(Preempted):
        t.fit()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000003"
    again = Trainer(_cfg(tmp_path, **{"train.steps": 4}))
    again.fit()
    assert [h["step"] for h in again.history] == [4]


def test_injected_fault_names_rank(tmp_path):
    with pytest.raises(InjectedFault, match="step 1 on rank 0"):
        Trainer(_cfg(tmp_path, **{"fault.fail_at_step": 1})).fit()

def test_eval_history_is_the_learning_curve_and_survives_resume(tmp_path):
    first = Trainer(_cfg(tmp_path, **{"train.steps": 4, "train.eval_every": 2}))
    first.fit()
    resumed = Trainer(_cfg(tmp_path, **{"train.eval_every": 2}))       # same folder, to step 6
    final = resumed.fit()
    history = read_eval_history(tmp_path / "run")
    assert list(history) == [2, 4, 6]
    assert history[6] == final and 0.0 <= history[2]["eval/scorer@0.5/acc"] <= 1.0
    assert set(history[2]) == set(final)


def test_resume_into_a_folder_trained_with_other_model_settings_says_so(tmp_path, capsys):
    """Same train.out_dir, same model: silent resume. Other model settings: the run still resumes
    (nothing written is lost) and says which keys differ and how to start the new model instead."""
    Trainer(_cfg(tmp_path, **{"train.steps": 2, "train.eval_prune_ratios": "[]"})).fit()
    capsys.readouterr()
    same = Trainer(_cfg(tmp_path, **{"train.steps": 3, "train.eval_prune_ratios": "[]"}))
    same.fit()
    assert same.history[0]["step"] == 3 and "other model settings" not in capsys.readouterr().out
    other = Trainer(_cfg(tmp_path, **{"train.steps": 4, "train.eval_prune_ratios": "[]",
                                      "model.connector.frame_time_encoding": True, "model.stts.aux_loss_weight": 0.25}))
    other.fit()
    out = capsys.readouterr().out
    assert other.history[0]["step"] == 4
    assert ("other model settings (model.connector.frame_time_encoding: False -> True; "
            "model.stts.aux_loss_weight: 0.5 -> 0.25)") in out and "another train.out_dir" in out


@pytest.mark.slow
def test_full_user_path_mp4_ray_shards_loader(tmp_path):
    """digits mp4 -> Ray sharding -> WebDataset loader -> training, and exact resume through it."""
    extra = {"data.source": "digits_mp4", "data.work_dir": str(tmp_path / "data"), "data.train_samples": 16,
             "data.shard_cpus": 1}
    full = Trainer(_cfg(tmp_path / "a", **extra))
    full.fit()
    assert len(list((tmp_path / "data").glob("digits_shards_*/index.json"))) == 1
    first = Trainer(_cfg(tmp_path / "b", **{**extra, "train.steps": 3}))
    first.fit()
    resumed = Trainer(_cfg(tmp_path / "b", **extra))
    resumed.fit()
    assert _losses(first) + _losses(resumed) == _losses(full)


def test_kept_token_picture_every_n_steps_reaches_the_callbacks(tmp_path):
    seen = []

    class Artifacts:
        def on_artifact(self, trainer, path, artifact_dir=None):
            seen.append((path, artifact_dir))

    t = Trainer(_cfg(tmp_path, **{"train.steps": 4, "tracking.visualize_every": 2}), callbacks=[Artifacts()])
    t.fit()
    pngs = sorted(p.name for p in (tmp_path / "run" / "kept_tokens").glob("*.png"))
    assert pngs == ["step_00000002.png", "step_00000004.png"]
    assert [os.path.basename(p) for p, _ in seen] == pngs and {d for _, d in seen} == {"kept_tokens"}


@pytest.mark.slow
@pytest.mark.parametrize("level, step_lines", [("quiet", []), ("info", [1, 4]), ("debug", [1, 2, 3, 4])])
def test_console_level_while_every_step_goes_to_the_run_log(tmp_path, capsys, level, step_lines):
    cfg = _cfg(tmp_path, **{"train.steps": 4, "train.log_every": 4, "train.log_level": level,
                            "train.eval_prune_ratios": "[0.0,0.5]"})
    Trainer(cfg).fit()
    out = capsys.readouterr().out
    assert [int(line.split("]")[0][6:]) for line in out.splitlines() if line.startswith("[step ")] == step_lines
    logged = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and all("loss" in r and "lr" in r for r in logged)
    # the final evaluation's accuracy-vs-tokens figure, for the run folder and MLflow
    assert (tmp_path / "run" / "eval" / "accuracy_vs_tokens_step_00000004.png").stat().st_size > 5_000


def test_final_table_says_a_pruned_models_none_row_is_not_the_unpruned_baseline(capsys):
    from stts_dist.train.cli import _print_summary
    results = {"eval/none@0/acc": 0.4, "eval/none@0/llm_visual_tokens": 104.6,
               "eval/scorer@0.5/acc": 0.5, "eval/scorer@0.5/llm_visual_tokens": 52.3}
    _print_summary(results, 1000, trained_method="scorer")
    out = capsys.readouterr().out
    assert "none@0           0.400 ±0.015" in out and "scorer@0.5       0.500 ±0.016" in out
    assert "none@0: this same model given every visual token, which it did not train on" in out
    _print_summary(results, 1000, trained_method="none")
    assert "did not train on" not in capsys.readouterr().out
