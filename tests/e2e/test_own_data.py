"""A user's own videos: their words are learned, their held-out data is evaluated, the run is
named after it. The data is the generated shapes set (data_pipeline/synth_shapes.py), never the digits."""
import json
import shutil

import pytest

from data_pipeline.synth_shapes import write_split
from stts_dist.config import ConfigError, load_config
from stts_dist.tokenizer import WordTokenizer, default_tokenizer, word_pieces
from stts_dist.train.trainer import Trainer, read_eval_history
from conftest import tiny_overrides


def test_word_tokenizer_learns_the_users_words():
    texts = ["What colour is the circle?", "red", "Which way does it move?", "left", "What colour is it?", "salt"]
    tok = WordTokenizer.from_texts(texts)
    assert word_pieces("Move? it's") == ["move", "?", "it", "'", "s"]
    ids = tok.encode("what colour is the circle ? red")
    assert tok.unk_id not in ids and tok.decode(ids) == "what colour is the circle ? red"
    assert tok.encode("move?") == [tok.stoi["move"], tok.stoi["?"]]
    assert tok.decode(tok.encode("salt")) == "salt"
    # most frequent first (? x3, colour/is/it/what x2), ties alphabetical: the ids do not depend on text order
    assert tok.itos[8:14] == ["?", "colour", "is", "it", "what", "circle"]
    assert WordTokenizer.from_texts(list(reversed(texts))).itos == tok.itos
    assert dict(tok.unknown_words(["What shape is it ? purple purple"])) == {"shape": 1, "purple": 2}
    assert WordTokenizer.from_json(tok.to_json()).itos == tok.itos


def test_digits_vocabulary_keeps_its_ids():
    tok = default_tokenizer()
    assert tok.vocab_size == 45 and tok.encode("which digit appears last ?") == [35, 22, 19, 28, 18]
    assert tok.encode("which digit appears first ?") == [35, 22, 19, 44, 18]     # a word added later comes last


def _shapes(tmp_path, train=480, test=90):
    out = tmp_path / "shapes"
    return (write_split(out, "train", train, 0, 4, 32, 4.0), write_split(out, "test", test, 1, 4, 32, 4.0))


def _cfg(tmp_path, train, test, **extra):
    return load_config("jobs/default.yaml", tiny_overrides(**{
        "data.source": "manifest", "data.path": str(train), **({"data.eval_path": str(test)} if test else {}),
        "data.work_dir": str(tmp_path / "work"), "data.eval_samples": 90, "model.pretrained.digits_vit_steps": 0,
        "train.out_dir": str(tmp_path / "run"), "train.steps": 300, "train.batch_size": 16,
        "optim.lr": 2e-3, "optim.vit_lr": 0.0, "train.eval_methods": "[]", "tracking.visualize_every": 0,
        "data.num_workers": 0, **extra}))


@pytest.mark.slow
def test_a_manifest_run_learns_its_words_and_is_evaluated_on_its_held_out_clips(tmp_path, capsys):
    train, test = _shapes(tmp_path)
    # one held-out clip whose answer no training clip has: reported, never silent
    rows = test.read_text().splitlines()
    odd = json.loads(rows[0]) | {"answer": "purple", "id": "odd"}
    test.write_text("\n".join(rows + [json.dumps(odd)]) + "\n")
    cfg = _cfg(tmp_path, train, test, **{"data.eval_samples": 91})
    assert cfg.name == "shapes-train-stts50"
    trainer = Trainer(cfg, callbacks=[])
    assert "colour" in trainer.tokenizer.stoi and "purple" not in trainer.tokenizer.stoi
    results = trainer.fit()
    # the shards carry the vocabulary learned from the manifest; the checkpoint the same
    step = tmp_path / "run" / "checkpoints" / "step_00000300"
    shard_vocab = next((tmp_path / "work").rglob("tokenizer.json")).read_text()
    assert (step / "tokenizer.json").read_text() == shard_vocab == trainer.tokenizer.to_json()
    # evaluated on the user's held-out clips and tasks, not on the digits
    assert {k.split("/")[-1] for k in results if "/acc/" in k} == {"colour", "direction", "shape"}
    assert len(trainer.eval_set) == 91
    assert results["eval/scorer@0.5/acc/colour"] >= 0.6                      # chance: 0.25 (four colours)
    assert abs(results["eval/unknown_word_share"] - 1 / (90 * 7 + 6 + 1)) < 0.02
    assert "answers contain one" in capsys.readouterr().out

    from stts_dist.eval.cli import run_eval
    rep = run_eval(["--checkpoint", str(tmp_path / "run"), "--data", f"manifest:{test}", "--methods", "scorer",
                    "--ratios", "0.5", "--tts-factor", "0", "--out", str(tmp_path / "eval"), "--quiet"])
    row = {r["setting"]: r for r in rep["rows"]}["scorer@0.5"]
    assert row["n"] == 91 and abs(row["acc"] - results["eval/scorer@0.5/acc"]) < 1e-9
    assert rep["unknown_words"]["answers_with_unknown"] == 1 and rep["unknown_words"]["top"] == ["purple"]


@pytest.mark.slow
def test_a_manifest_run_without_held_out_data_says_so(tmp_path, capsys):
    train, _ = _shapes(tmp_path, train=32, test=1)
    trainer = Trainer(_cfg(tmp_path, train, None, **{"train.steps": 2, "train.batch_size": 4}), callbacks=[])
    assert trainer.eval_set == [] and trainer.fit() == {}
    assert "no accuracy evaluation; set data.eval_path" in capsys.readouterr().out


@pytest.mark.slow
def test_one_shard_folder_per_input_serves_every_method_and_ratio(tmp_path):
    train, test = _shapes(tmp_path, train=32, test=8)
    folders = set()
    for method, ratio in (("none", 0.5), ("scorer", 0.5), ("random", 0.7)):
        cfg = _cfg(tmp_path, train, None, **{"model.stts.method": method, "model.stts.prune_ratio": ratio,
                                             "train.steps": 1, "train.batch_size": 4})
        Trainer(cfg, callbacks=[])
        folders |= {p.name for p in (tmp_path / "work").iterdir()}
    assert len(folders) == 1 and next(iter(folders)).startswith("shards_shapes_train_")
    # another manifest in the same work_dir gets a folder of its own, never a refusal
    Trainer(_cfg(tmp_path, test, None, **{"train.steps": 1, "train.batch_size": 4}), callbacks=[])
    assert len(list((tmp_path / "work").iterdir())) == 2


def test_eval_path_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="data.eval_path=.*does not exist"):
        load_config(None, ["data.source=manifest", f"data.path={tmp_path}/t.jsonl", f"data.eval_path={tmp_path}/x.jsonl"])
    with pytest.raises(ConfigError, match="digits task's own held-out split"):
        load_config(None, [f"data.eval_path={tmp_path}"])


@pytest.mark.slow
def test_shards_without_a_vocabulary_name_the_rebuild(tmp_path):
    train, _ = _shapes(tmp_path, train=16, test=1)
    cfg = _cfg(tmp_path, train, None, **{"train.steps": 1, "train.batch_size": 4})
    Trainer(cfg, callbacks=[])
    shards = next((tmp_path / "work").glob("shards_*"))
    (shards / "tokenizer.json").unlink()
    copy = tmp_path / "old_shards"
    shutil.copytree(shards, copy)
    from stts_dist.train.vocabulary import VocabularyError
    with pytest.raises(VocabularyError, match="python -m data_pipeline.build_shards"):
        Trainer(_cfg(tmp_path, copy, None, **{"data.source": "shards", "train.steps": 1, "train.batch_size": 4}),
                callbacks=[])


@pytest.mark.slow
def test_the_readme_walk_through_on_a_second_dataset_with_two_zero3_ranks(tmp_path):
    """README "your own videos": generate -> torchrun 2 ranks (ZeRO-3; Ray shards the manifest)
    -> stts-eval -> stts-infer, the README's commands with a tiny model and the test's paths.
    That the model learns the user's data (colour far above chance on the held-out clips) is
    asserted by test_a_manifest_run_learns_its_words_and_is_evaluated_on_its_held_out_clips
    (one process, 300 steps); this walk-through checks that the commands chain up (40 steps)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[2]
    venv = Path(sys.executable).parent
    # one thread per rank, as torchrun's own default (the suite's OMP_NUM_THREADS=2 would oversubscribe)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")

    def run(*cmd, timeout=600):
        done = subprocess.run([str(c) for c in cmd], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        return done

    data, out = tmp_path / "shapes", tmp_path / "run"
    run(sys.executable, "-m", "data_pipeline.synth_shapes", "--out", data, "--train", 160, "--test", 40,
        "--image-size", 32, "--frames", 4)
    overrides = tiny_overrides(**{
        "data.path": data / "train.jsonl", "data.eval_path": data / "test.jsonl", "data.work_dir": tmp_path / "work",
        "data.eval_samples": 40, "train.out_dir": out, "train.steps": 40, "train.batch_size": 16, "train.eval_every": 0,
        "optim.lr": 2e-3, "train.eval_methods": "[]", "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlruns.db",
        "tracking.artifact_location": tmp_path / "mlartifacts", "tracking.visualize_every": 0})
    log = run(venv / "torchrun", "--standalone", "--nproc_per_node", 2, "-m", "stts_dist.train",
              "--config", "jobs/own_videos.yaml", *overrides).stdout
    assert "[train] shapes-train-stts50" in log and "with Ray" in log
    final = read_eval_history(out)[40]                               # the run's own record, unrounded
    assert json.loads(log.strip().splitlines()[-1])["eval/scorer@0.5/acc"] == round(final["eval/scorer@0.5/acc"], 4)
    assert {k.split("/")[-1] for k in final if k.startswith("eval/scorer@0.5/acc/")} == {"colour", "direction", "shape"}
    eval_out = run(venv / "stts-eval", "--checkpoint", out, "--data", f"manifest:{data / 'test.jsonl'}",
                   "--ratios", "0,0.5", "--methods", "scorer,random", "--out", tmp_path / "eval").stdout
    rows = {r["setting"]: r for r in json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]}
    assert abs(rows["scorer@0.5"]["acc"] - final["eval/scorer@0.5/acc"]) < 1e-9   # same clips, same model
    assert rows["scorer@0.5"]["n"] == 40 and "colour" in eval_out
    answer = run(venv / "stts-infer", "--checkpoint", out, "--video", data / "videos" / "test_000000.mp4",
                 "--question", "What colour is the moving shape?", "--json")
    reply = json.loads(answer.stdout)
    first = json.loads((data / "test.jsonl").read_text().splitlines()[0])
    assert first["question"] == "What colour is the moving shape?"
    assert reply["answers"][0]["answer"] in ("red", "green", "blue", "yellow")
