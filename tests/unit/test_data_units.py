"""Pure pieces of the data pipeline: manifest parsing, frame selection, epoch plans, member names.

No Ray, no video files: these run in well under a second.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.config import load_sharding_config
from data_pipeline.epoch_plan import DatasetLayout, EpochPlan, blend_counts, dataset_pass_order, split_by_dp
from data_pipeline.errors import ManifestError, UnsafeMemberError
from data_pipeline.manifest import cap_per_task, read_manifest
from data_pipeline.safe_decode import check_member_name
from data_pipeline.video import select_frames
from stts_dist.config import ConfigError


# -- manifest -----------------------------------------------------------------------------------

def write_manifest(tmp_path: Path, rows: list) -> Path:
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = {"video": "a.mp4", "question": "how many ?", "answer": "3"}


def test_manifest_resolves_paths_and_defaults(tmp_path):
    path = write_manifest(tmp_path, [GOOD, "", {**GOOD, "video": "/abs/b.mp4", "id": 7, "task": "count",
                                                "start": 1, "end": 2.5, "turns": [{"question": "q2", "answer": "a2"}],
                                                "meta": {"cam": 1}}])
    a, b = read_manifest(path)
    assert (a.id, a.line, a.video, a.video_ref) == ("1", 1, str(tmp_path / "a.mp4"), "a.mp4")
    assert (a.start, a.end, a.turns, a.task) == (None, None, (), "")
    assert (b.id, b.line, b.video, b.start, b.end) == ("7", 3, "/abs/b.mp4", 1.0, 2.5)
    assert b.turns == (("q2", "a2"),) and b.meta == {"cam": 1}


@pytest.mark.parametrize("row, needle", [
    ({**GOOD, "question": 5}, "key 'question' must be a string, got integer 5"),
    ({"video": "a.mp4", "question": "q"}, "key 'answer' is missing"),
    ({**GOOD, "start": True}, "key 'start' must be a finite number of seconds, got boolean"),
    ({**GOOD, "start": "1.0"}, "key 'start' must be a finite number"),
    ({**GOOD, "start": 3, "end": 2}, "key 'end' (2.0) must be greater than 'start' (3.0)"),
    ({**GOOD, "questoin": "x"}, "Did you mean 'question'?"),
    ({**GOOD, "turns": {"question": "q"}}, "key 'turns' must be a list"),
    ({**GOOD, "turns": [{"question": "q", "answer": 1}]}, "key 'turns[0].answer' must be a string"),
    ({**GOOD, "id": [1]}, "key 'id' must be a string or integer, got list"),
    ({**GOOD, "video": ""}, "key 'video' is an empty string"),
    ("[1, 2]", "must be a JSON object, got list"),
    ('{"video": "a.mp4",', "not valid JSON"),
])
def test_manifest_bad_line_names_line_and_key(tmp_path, row, needle):
    path = write_manifest(tmp_path, [GOOD, row])
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    assert f"{path} line 2" in str(e.value)
    assert needle in str(e.value)


def test_manifest_duplicate_ids_and_missing_file(tmp_path):
    with pytest.raises(ManifestError, match="line 2: key 'id' value 'x' repeats line 1"):
        read_manifest(write_manifest(tmp_path, [{**GOOD, "id": "x"}, {**GOOD, "id": "x"}]))
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")


def test_cap_per_task_keeps_first_n_in_order(tmp_path):
    rows = [{**GOOD, "task": t} for t in ["a", "b", "a", "a", "b"]]
    kept = cap_per_task(read_manifest(write_manifest(tmp_path, rows)), 2)
    assert [e.line for e in kept] == [1, 2, 3, 5]


def test_sharding_config_errors_name_key():
    with pytest.raises(ConfigError, match="unknown config key 'fpss'. Did you mean 'fps'"):
        load_sharding_config(None, ["manifest=m", "out_dir=o", "fpss=2"])
    with pytest.raises(ConfigError, match="wrong type for config key 'max_frames'"):
        load_sharding_config(None, ["manifest=m", "out_dir=o", "max_frames=many"])
    with pytest.raises(ConfigError, match="frame_format='png' must be one of"):
        load_sharding_config(None, ["manifest=m", "out_dir=o", "frame_format=png"])
    cfg = load_sharding_config(Path(__file__).parents[2] / "jobs" / "build_shards.yaml", ["num_cpus=3"])
    assert (cfg.num_cpus, cfg.frame_format, cfg.target_shard_bytes) == (3, "jpeg", 256 * 1024 * 1024)


# -- frame selection ----------------------------------------------------------------------------

def test_select_frames_by_fps_takes_frame_on_screen():
    times = np.arange(100) / 25.0  # 4 s at 25 fps
    idx = select_frames(times, None, None, fps=2.0, max_frames=16)
    # the frame on screen at k/2 s is floor(k * 12.5)
    np.testing.assert_array_equal(idx, [0, 12, 25, 37, 50, 62, 75, 87])


def test_select_frames_uniform_when_long_and_clip_window():
    times = np.arange(250) / 25.0  # 10 s
    idx = select_frames(times, None, None, fps=2.0, max_frames=4)  # 20 targets > 4 -> window centres
    np.testing.assert_array_equal(idx, [31, 93, 156, 218])  # 1.25 s, 3.75 s, 6.25 s, 8.75 s
    idx = select_frames(times, 2.0, 3.0, fps=0.0, max_frames=100)  # every native frame of [2, 3)
    np.testing.assert_array_equal(idx, np.arange(50, 75))
    idx = select_frames(times, 2.0, 3.0, fps=0.0, max_frames=5)
    np.testing.assert_array_equal(idx, [52, 57, 62, 67, 72])
    assert len(select_frames(times, 20.0, None, fps=1.0, max_frames=4)) == 0  # starts after the end
    np.testing.assert_array_equal(select_frames(times, None, None, fps=100.0, max_frames=1000), np.arange(250))


# -- epoch plan ---------------------------------------------------------------------------------

def layout(sizes_per_shard: list[int]) -> DatasetLayout:
    return DatasetLayout(np.repeat(np.arange(len(sizes_per_shard)), sizes_per_shard), len(sizes_per_shard))


def test_pass_order_is_a_seeded_permutation_that_keeps_shard_locality():
    lay = layout([10] * 10)
    a = dataset_pass_order(lay.shard_of_sample, 10, seed=1, dataset=0, pass_index=0, shuffle_shards=True, shuffle_window=10)
    b = dataset_pass_order(lay.shard_of_sample, 10, seed=1, dataset=0, pass_index=0, shuffle_shards=True, shuffle_window=10)
    c = dataset_pass_order(lay.shard_of_sample, 10, seed=1, dataset=0, pass_index=1, shuffle_shards=True, shuffle_window=10)
    np.testing.assert_array_equal(a, b)
    assert sorted(a.tolist()) == list(range(100)) and not np.array_equal(a, c)
    # window 10 = shard size: each window of 10 holds exactly one shard's samples
    shards = lay.shard_of_sample[a].reshape(10, 10)
    assert all(len(set(row)) == 1 for row in shards.tolist())


def test_dp_ranks_get_disjoint_equal_slices_padded_by_wrapping():
    plan = EpochPlan([layout([7, 7, 7])], [1.0], seed=3, dp_size=4, shuffle_window=5)
    assert (plan.epoch_size, plan.samples_per_rank) == (21, 6)
    slices = [plan.rank_order(0, r) for r in range(4)]
    flat = np.concatenate(slices)[:, 1].tolist()
    assert set(flat) == set(range(21)) and len(flat) == 24  # 3 padded samples repeat the head
    glob = plan.global_order(0)
    for r in range(4):  # the webdataset-style filter and the vectorised slice agree
        assert [tuple(x) for x in split_by_dp(np.resize(glob, (24, 2)).tolist(), r, 4)] == [tuple(x) for x in slices[r].tolist()]
    drop = EpochPlan([layout([7, 7, 7])], [1.0], seed=3, dp_size=4, pad_to_equal=False)
    assert drop.samples_per_rank == 5 and drop.steps_per_epoch(2) == 2


def test_blending_counts_and_streams_across_epochs():
    assert blend_counts([100, 10], [3.0, 1.0], 40) == [30, 10]
    assert blend_counts([5, 5, 5], [1, 1, 1], 10) == [4, 3, 3]
    plan = EpochPlan([layout([20, 20]), layout([4])], [3.0, 1.0], seed=0, samples_per_epoch=16)
    assert plan.counts == [12, 4]
    seen_small = []
    for epoch in range(3):
        order = plan.global_order(epoch)
        assert (order[:, 0] == 0).sum() == 12 and (order[:, 0] == 1).sum() == 4
        big = order[order[:, 0] == 0, 1]
        assert len(set(big.tolist())) == 12  # no repeats inside the large dataset's share
        seen_small.append(sorted(order[order[:, 0] == 1, 1].tolist()))
    assert seen_small == [[0, 1, 2, 3]] * 3  # the small dataset is cycled: one full pass per epoch


# -- member allow-list --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["s000000001.json", "s1.000.jpg", "a-b_c.123.npy", "k.txt", "k.007.png"])
def test_allowed_member_names(name):
    assert check_member_name("x.tar", name)[0] == name.split(".")[0]


@pytest.mark.parametrize("name", ["k.pyd", "k.pickle", "k.000.pyd", "k.pth", "../k.json", "a/b.json", "k.1.jpg", "k.json.gz"])
def test_rejected_member_names(name):
    with pytest.raises(UnsafeMemberError, match=f"shard x.tar: member '{name}'"):
        check_member_name("x.tar", name)


def test_mp4_digits_vary_in_length_exactly_like_the_in_memory_digits(tmp_path):
    """data.min_frames: the digits written as mp4 for sharding (digits_mp4) have the lengths of the
    in-memory clips (digits) of the same index, by one rule (stts_dist.data.digits.clip_frames)."""
    import json
    import av
    from data_pipeline.synth_digits import write_synthetic
    from stts_dist.data.digits import clip_frames
    from stts_dist.samples import DigitsDataset
    manifest = write_synthetic(tmp_path, 6, frames=8, image_size=32, seed=3, min_frames=3)
    written = []
    for line in manifest.read_text().splitlines():
        with av.open(str(tmp_path / json.loads(line)["video"])) as container:
            written.append(sum(1 for _ in container.decode(video=0)))
    in_memory = [DigitsDataset(6, 3, 8, 32, ["count"], min_frames=3).frames_for(i) for i in range(6)]
    assert written == in_memory == [clip_frames(i, 3, 8, 3) for i in range(6)]
    assert all(3 <= n <= 8 for n in written) and len(set(written)) > 1
    assert clip_frames(0, 3, 8, 0) == 8 and clip_frames(0, 3, 8, 8) == 8     # unset / equal: fixed length


def test_mp4_digits_write_their_follow_up_questions_as_manifest_turns(tmp_path):
    """digits_mp4 with data.follow_up_questions: the manifest entry carries the follow-up as
    ``turns`` (what the shard index counts and the sequence builder packs)."""
    import functools
    from data_pipeline.synth_digits import write_synthetic
    from stts_dist.data.digits import FOLLOW_UPS, make_sample
    manifest = write_synthetic(tmp_path, 8, frames=4, image_size=32, seed=1,
                               sample_fn=functools.partial(make_sample, follow_ups=("last", "corner")))
    entries = read_manifest(manifest)
    for entry in entries:
        s = make_sample(int(entry.id.split("-")[-1]), 1, 4, 32, follow_ups=("last", "corner"))
        assert entry.turns == tuple((t["question"], t["answer"]) for t in s["turns"])
        assert len(entry.turns) == int(entry.task in ("last", "corner"))
        assert not entry.turns or entry.turns[0][0] == FOLLOW_UPS[entry.task]
    assert any(entry.turns for entry in entries)
    plain = write_synthetic(tmp_path / "plain", 8, frames=4, image_size=32, seed=1)
    assert all(not e.turns for e in read_manifest(plain))
