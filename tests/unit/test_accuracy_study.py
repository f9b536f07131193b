"""tools/accuracy_study.py's summary: the issue-7 targets are computed from stts-eval's rows."""
import json
from pathlib import Path

import pytest
from conftest import load_tool


def _study():
    return load_tool("accuracy_study")


def _row(setting, method, ratio, kind, acc, tokens, speedup=1.0):
    return {"setting": setting, "method": method, "prune_ratio": ratio, "frames": 16 if kind == "tts" else 8,
            "kind": kind, "n": 100, "acc": acc, "acc/count": acc, "acc/last": acc, "llm_visual_tokens": tokens,
            "speedup": speedup}


def _write(out: Path, model: str, accs: dict, adaptive: dict, ratios=(0.3, 0.5, 0.7, 0.8)):
    rows = [_row("none@0", "none", 0.0, "baseline", accs["none@0"], 128)]
    for m in ("scorer", "random", "uniform", "temporal_diff"):
        for r in ratios:
            rows.append(_row(f"{m}@{r:g}", m, r, "sweep", accs.get(f"{m}@{r:g}", 0.5), 128 - int(128 * r),
                             speedup=1 / (1 - r / 2)))
        rows.append(_row(f"{m}@0.5 tts 16f", m, 0.5, "tts", accs.get(f"{m} tts", 0.5), 128))
    ad = [_row("none@0", "none", 0.0, "baseline", accs["none@0"], 128)]
    for m in ("scorer", "temporal_diff"):
        for r in ratios:
            ad.append(_row(f"{m}@{r:g}", m, r, "sweep", accs.get(f"{m}@{r:g}", 0.5), 128 - int(128 * r)))
            ad.append(_row(f"{m}@{r:g} adaptive", m, r, "adaptive", adaptive.get(f"{m}@{r:g}", 0.5), 128 - int(128 * r)))
    for sub, data in (("eval", rows), ("eval_adaptive", ad)):
        (out / model / sub).mkdir(parents=True)
        (out / model / sub / "results.json").write_text(json.dumps({"rows": data}))


@pytest.mark.slow
def test_summary_checks_the_targets_from_the_rows(tmp_path):
    study = _study()
    _write(tmp_path, "unpruned", {"none@0": 0.80, "random@0.8": 0.70, "uniform@0.8": 0.60}, {})
    _write(tmp_path, "stts50", {"none@0": 0.79, "scorer@0.5": 0.795, "scorer tts": 0.81},
           {"scorer@0.5": 0.80})
    _write(tmp_path, "stts80", {"none@0": 0.78, "scorer@0.8": 0.75, "random@0.8": 0.74, "uniform@0.8": 0.70},
           {"scorer@0.8": 0.77})
    curves = {"stts50": [0.60, 0.78, 0.795], "unpruned": [0.62, 0.79, 0.80], "stts80": [0.5, 0.70, 0.75],
              "stts50_seed1": [0.6, 0.79, 0.785], "unpruned_seed1": [0.6, 0.80, 0.805],
              "stts50_dense_vit": [0.61, 0.775, 0.77]}
    for name, accs in curves.items():                 # learning curves at steps 100, 200, 300
        (tmp_path / name).mkdir(exist_ok=True)
        setting = study.OWN_SETTING[name]
        (tmp_path / name / "eval_history.jsonl").write_text("".join(
            json.dumps({"step": 100 * (i + 1), f"eval/{setting}/acc": a}) + "\n" for i, a in enumerate(accs)))
    res = study.summarize(tmp_path, 300)
    assert abs(res["stts50_minus_unpruned"] - (-0.5)) < 1e-9          # 79.5 vs 80.0
    assert abs(res["stts80_minus_random"] - 1.0) < 1e-9 and abs(res["stts80_minus_uniform"] - 5.0) < 1e-9
    assert abs(res["stts80_minus_random_on_unpruned_model"] - 5.0) < 1e-9
    assert abs(res["tts_minus_unpruned"] - 1.0) < 1e-9 and res["tts_setting"] == "scorer@0.5 tts 16f"
    assert abs(res["adaptive_minus_fixed_stts50"] - 0.5) < 1e-9 and abs(res["adaptive_minus_fixed_stts80"] - 2.0) < 1e-9
    assert res["targets"] == {"stts50_within_0.7pt": True, "stts80_beats_random_uniform_by_2pt": False,
                              "tts_at_least_unpruned": True}
    assert abs(res["prefill_speedup"]["scorer"]["0.5"] - 1 / 0.75) < 1e-9
    conv = res["convergence"]
    # converged: the final evaluation and the latest one >= 20% of training earlier (step 200) within 1 point
    assert abs(conv["stts50"]["last_change_points"] - 1.5) < 1e-9 and not conv["stts50"]["converged"]
    assert abs(conv["unpruned"]["last_change_points"] - 1.0) < 1e-9 and conv["unpruned"]["converged"]
    assert conv["stts80"]["compared_with_step"] == 200 and not conv["stts80"]["converged"]
    assert not res["all_converged"]
    assert abs(res["stts50_minus_unpruned_seed1"] - (-2.0)) < 1e-9           # 78.5 vs 80.5
    assert abs(res["stts50_minus_unpruned_mean_of_seeds"] - (-1.25)) < 1e-9
    # the variant is compared by its own last evaluation: 77.0 vs unpruned 80.0, converged (-0.5)
    assert abs(res["stts50_dense_vit_minus_unpruned"] - (-3.0)) < 1e-9 and conv["stts50_dense_vit"]["converged"]
    table = (tmp_path / "summary.md").read_text().splitlines()
    assert table[0].startswith("| model | setting |") and len(table) == 2 + 3 * (21 + 8) + 3 + 6
    assert (tmp_path / "accuracy_study.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "summary.json").read_text())["targets"] == res["targets"]


@pytest.mark.slow
def test_a_sweep_of_the_two_target_ratios_is_summarised(tmp_path):
    """``--ratios 0.5,0.8``: the targets and the prefill speed-ups come from the ratios swept."""
    study = _study()
    two = (0.5, 0.8)
    _write(tmp_path, "unpruned", {"none@0": 0.70, "random@0.8": 0.60, "uniform@0.8": 0.58}, {}, two)
    _write(tmp_path, "stts50", {"none@0": 0.69, "scorer@0.5": 0.71, "scorer tts": 0.72}, {"scorer@0.5": 0.70}, two)
    _write(tmp_path, "stts80", {"none@0": 0.6, "scorer@0.8": 0.66, "random@0.8": 0.63, "uniform@0.8": 0.62},
           {"scorer@0.8": 0.65}, two)
    res = study.summarize(tmp_path, 300)
    assert abs(res["stts50_minus_unpruned"] - 1.0) < 1e-9
    assert abs(res["stts80_minus_random"] - 3.0) < 1e-9 and abs(res["stts80_minus_uniform"] - 4.0) < 1e-9
    assert res["targets"]["stts80_beats_random_uniform_by_2pt"]
    assert sorted(res["prefill_speedup"]["random"]) == ["0.5", "0.8"]
    assert abs(res["prefill_speedup"]["uniform"]["0.8"] - 1 / 0.6) < 1e-9
    assert not res["all_converged"]                  # no learning curves written


def test_the_dense_vit_variant_prunes_after_the_second_to_last_block():
    """The variant's prune point comes from the study config's ViT (depth 6 -> prune_at=4: blocks
    0-5 see every patch), the reference models keep the config's prune point."""
    study = _study()
    overrides = study.training_overrides(study.load_config(study.ROOT / "jobs/study_digits.yaml"))
    assert overrides["stts50_dense_vit"] == overrides["stts50"] + ["model.stts.prune_at=4"]
    assert not any("prune_at" in o for o in overrides["stts50"] + overrides["stts80"] + overrides["unpruned"])
    assert overrides["stts50_seed1"] == overrides["stts50"] + ["train.seed=1"]


def test_train_only_names_an_unknown_model(capsys):
    study = _study()
    with pytest.raises(SystemExit):
        study.main(["--train-only", "stts50,sts80", "--out", "runs/_never_written"])
    assert "unknown ['sts80']" in capsys.readouterr().err
