"""The sample-source stack (``stts_dist/samples``): sampler -> split -> reader -> collate.

The shard path is checked against the data pipeline's own ``VideoLoader`` (what the trainer read
before the stack), sample for sample, on every rank, across epochs and through saved states."""
import numpy as np
import pytest

from shard_utils import tiny_shards


def _ids(samples):
    return [s["id"] for s in samples]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory.mktemp("stack"))


def _loader(shards, rank, **extra):
    from data_pipeline.loader import VideoLoader
    return VideoLoader({"datasets": [{"path": str(shards)}], "seed": 3, "num_workers": 0, **extra},
                       dp_rank=rank, dp_size=2)


def _shard_stack(shards, rank, workers=1):
    from data_pipeline.dataset_index import load_index
    from stts_dist.samples import SampleStack, ShardOrderSampler, ShardReader, StridedSplit
    index = load_index(shards)
    return SampleStack(ShardOrderSampler(index, 4, 3, rank, 2), StridedSplit(rank, 2), ShardReader(index, workers))


@pytest.mark.parametrize("rank", [0, 1])
def test_shard_stack_reads_exactly_what_the_video_loader_reads_across_epochs(shards, rank):
    # 12 samples over 2 ranks = 6 per rank, 2 per step: 3 steps per epoch, so 7 steps cross two epochs
    it = _loader(shards, rank).iter_batches(2, _ids, epochs=None)
    expected = [next(it) for _ in range(7)]
    assert len({i for b in expected[:3] for i in b}) == 6          # an epoch: 6 distinct samples per rank
    stack = _shard_stack(shards, rank)
    got, states = zip(*stack.batches(7, _ids))
    assert list(got) == expected
    assert [(s["sampler"]["epoch"], s["sampler"]["position"]) for s in states] == [
        (0, 2), (0, 4), (0, 6), (1, 2), (1, 4), (1, 6), (2, 2)]


def test_shard_stack_state_is_the_loaders_both_ways(shards):
    from stts_dist.samples import upgrade_state
    it = _loader(shards, 1).iter_batches(2, _ids, epochs=None)
    expected = [next(it) for _ in range(6)]
    head = _shard_stack(shards, 1)
    _ = [b for b, _ in head.batches(4, _ids)]
    # the stack's saved sampler state resumes the data pipeline's loader ...
    loader = _loader(shards, 1)
    loader.load_state_dict(head.state_dict()["sampler"])
    assert [b for b in loader.iter_batches(2, _ids, epochs=1)][:2] == expected[4:6]
    # ... and a checkpoint written by the loader-based source before the stack resumes the stack
    old = _loader(shards, 1)
    old_it = old.iter_batches(2, _ids, epochs=None)
    _ = [next(old_it) for _ in range(4)]
    legacy = old.state_dict()
    assert "sampler" not in legacy and upgrade_state(legacy)["sampler"] is legacy
    tail = _shard_stack(shards, 1, workers=0)
    tail.load_state_dict(legacy)
    assert [b for b, _ in tail.batches(2, _ids)] == expected[4:6]
    with pytest.raises(ValueError, match=r"cannot resume the data loader: seed \(saved 3, now 4\)"):
        from data_pipeline.dataset_index import load_index
        from stts_dist.samples import ShardOrderSampler
        ShardOrderSampler(load_index(shards), 4, 4, 1, 2).load_state_dict(legacy)


def test_digits_stack_resumes_from_the_unbalanced_sources_older_state():
    from stts_dist.samples import DigitsDataset, DigitsReader, PermutationSampler, SampleStack, StridedSplit

    def stack():
        return SampleStack(PermutationSampler(10, 4, 5), StridedSplit(1, 2),
                           DigitsReader(DigitsDataset(10, 5, 2, 32, ["count"])))
    full = [b for b, _ in stack().batches(5, _ids)]
    assert [len(b) for b in full] == [2] * 5
    rows = np.concatenate([np.random.default_rng([5, e]).permutation(10)[:8] for e in (0, 1, 2)])
    assert full == [[f"digits-train-5-{r}" for r in rows[4 * s + 1:4 * s + 4:2]] for s in range(5)]
    older = {"epoch": 1, "position": 4, "seed": 5, "size": 10}   # EpochSampler's format: after step 3
    resumed = stack()
    resumed.load_state_dict(older)
    assert [b for b, _ in resumed.batches(2, _ids)] == full[3:5]
    assert resumed.state_dict() == {"version": 2, "sampler": {"epoch": 2, "position": 4, "seed": 5, "size": 10},
                                    "split": None}


def test_heldout_shards_are_read_in_shard_order_split_over_ranks(shards):
    from data_pipeline.loader import VideoLoader
    from stts_dist.heldout import ShardSource
    in_order = [s["id"] for s in VideoLoader({"datasets": [{"path": str(shards)}], "shuffle_shards": False,
                                              "shuffle_window": 0, "num_workers": 0})]
    source = ShardSource(str(shards), limit=7, workers=1)
    per_rank = [source.samples(source.frames, r, 2) for r in range(2)]
    assert [s["id"] for s in per_rank[0]] == in_order[0:7:2]
    assert [s["id"] for s in per_rank[1]] == in_order[1:7:2]
    sample = per_rank[1][0]
    assert isinstance(sample["frames"], np.ndarray) and sample["frames"].dtype == np.uint8
    assert sample["frames"].shape[1:] == (32, 32, 3) and set(sample) == {"frames", "question", "answer", "id", "task"}


# -- conversations: every follow-up turn is trained, and budgeted ---------------------------------

def _turns(row):
    """Row r's follow-up turns: r % 3 of them, digits questions and answers (in the word vocabulary)."""
    from stts_dist.data.digits import QUESTIONS
    return [{"question": QUESTIONS["count"], "answer": str(1 + (row + k) % 3)} for k in range(row % 3)]


def test_follow_up_turns_are_trained_with_labels_on_every_answer():
    from stts_dist.data.batch import IGNORE, SPECIAL_TOKENS, TURN_TOKENS, SequenceBuilder
    from stts_dist.data.digits import QUESTIONS
    from stts_dist.stts.budget import TokenBudget
    from stts_dist.tokenizer import default_tokenizer
    tok = default_tokenizer()
    budget = TokenBudget(method="none", prune_ratio=0.0, groups_per_frame=4, patches_per_frame=16)
    frames = np.zeros((3, 32, 32, 3), np.uint8)
    single = {"frames": frames, "question": QUESTIONS["last"], "answer": "7", "id": "a"}
    turns = [{"question": QUESTIONS["count"], "answer": "2"}, {"question": QUESTIONS["corner"], "answer": "9"}]
    as_dicts, as_pairs = dict(single, turns=turns), dict(single, turns=[(t["question"], t["answer"]) for t in turns])
    build = SequenceBuilder(tok, budget, 32)
    one, multi, pairs = build([single]), build([as_dicts]), build([as_pairs])
    assert torch_equal(multi.input_ids, pairs.input_ids) and torch_equal(multi.labels, pairs.labels)
    q = {k: len(tok.encode(v)) for k, v in QUESTIONS.items()}
    span = 3 * 4
    assert one.seq_lengths == [SPECIAL_TOKENS + span + q["last"] + 1]
    assert multi.seq_lengths == [SPECIAL_TOKENS + span + q["last"] + 1 + 2 * TURN_TOKENS + q["count"] + 1 + q["corner"] + 1]
    # the single-question sequence is the conversation's prefix, and only answers (+ <eos>) are targets
    n = one.seq_lengths[0]
    assert multi.input_ids[:n].tolist() == one.input_ids.tolist()
    rest = multi.input_ids[n:].tolist()
    assert rest == ([tok.user_id] + tok.encode(QUESTIONS["count"]) + [tok.assistant_id] + tok.encode("2") + [tok.eos_id] +
                    [tok.user_id] + tok.encode(QUESTIONS["corner"]) + [tok.assistant_id] + tok.encode("9") + [tok.eos_id])
    targets = multi.labels[multi.labels != IGNORE].tolist()
    assert targets == tok.encode("7") + [tok.eos_id] + tok.encode("2") + [tok.eos_id] + tok.encode("9") + [tok.eos_id]
    # generation asks the first question only
    assert build([as_dicts], with_answer=False).input_ids.tolist() == build([single], with_answer=False).input_ids.tolist()


def torch_equal(a, b):
    return a.shape == b.shape and bool((a == b).all())


def test_balanced_shards_with_follow_up_turns_budget_exactly_what_the_builder_packs(tmp_path):
    from conftest import tiny_overrides
    from data_pipeline.dataset_index import load_index
    from stts_dist.config import load_config
    from stts_dist.data.batch import SequenceBuilder
    from stts_dist.samples import training_stack
    from stts_dist.stts.budget import TokenBudget
    from stts_dist.tokenizer import default_tokenizer
    shards = tiny_shards(tmp_path, follow_up_turns=_turns)
    index = load_index(shards)
    assert index.turns.tolist() == [len(_turns(int(i.split("-")[-1]))) for i in index.ids]   # ids end in the row
    assert sorted(set(index.turns.tolist())) == [0, 1, 2]
    cfg = load_config(None, tiny_overrides(**{"balance.enabled": True, "data.source": "shards", "data.path": str(shards),
                                              "data.num_frames": 12, "train.batch_size": 4}))
    budget, tok = TokenBudget.from_model_config(cfg.model), default_tokenizer()
    stack = training_stack(cfg, budget, 0, 1, shards, tok)
    collate = SequenceBuilder(tok, budget, cfg.model.vit.image_size)
    seen = 0
    for batch, _ in stack.batches(3, collate):
        rows = [index.ids.index(i) for i in batch.ids]
        assert batch.seq_lengths == stack.split.table.llm_tokens[rows].tolist()     # exact, turns included
        seen += sum(int(index.turns[r]) for r in rows)
    assert seen > 0
    # an index written before turns were counted budgets them as absent: refused by the token check
    legacy = load_index(shards)
    legacy.turns = None
    from stts_dist.samples import TokenCountMismatch, sample_table
    short = sample_table(budget, legacy.frames, legacy.text_tokens, legacy.turns)
    stack.split.table = short
    with pytest.raises(TokenCountMismatch, match="written before follow-up turns were counted"):
        for _ in stack.batches(3, collate):
            pass


def test_balancing_shards_with_another_tokenizer_is_refused_naming_the_fix(shards):
    from conftest import tiny_overrides
    from stts_dist.config import load_config
    from stts_dist.samples import training_stack
    from stts_dist.stts.budget import TokenBudget

    class SubwordTokenizer:              # stands in for a pretrained LLM's tokenizer
        vocab_size = 100

    cfg = load_config(None, tiny_overrides(**{"balance.enabled": True, "data.source": "shards", "data.path": str(shards),
                                              "data.num_frames": 12, "train.batch_size": 4}))
    with pytest.raises(ValueError, match=r"balance.enabled=true over shards needs the word tokenizer: .* "
                                         r"SubwordTokenizer .* set balance.enabled=false"):
        training_stack(cfg, TokenBudget.from_model_config(cfg.model), 0, 2, shards, SubwordTokenizer())


def test_digits_follow_up_questions_answer_the_same_scene():
    """data.follow_up_questions: the clip is unchanged, and the second question's answer is read
    off the scene the generator drew (who appears first, who moves right, who ends bottom right)."""
    from stts_dist.data.digits import FOLLOW_UPS, QUESTIONS, make_sample
    seen = set()
    for i in range(40):
        plain = make_sample(i, 5, 8, 64, style="printed")
        s = make_sample(i, 5, 8, 64, style="printed", follow_ups=tuple(FOLLOW_UPS))
        assert np.array_equal(plain["frames"], s["frames"]) and plain["answer"] == s["answer"]
        assert "turns" not in plain and s["question"] == QUESTIONS[s["task"]]
        objects, task = s["objects"], s["task"]
        if task == "count":
            assert s["turns"] == []
            continue
        (turn,) = s["turns"]
        assert turn["question"] == FOLLOW_UPS[task]
        classes, visible, positions = objects["classes"], objects["visible"], objects["positions"]
        if task == "last":
            first_seen = visible.argmax(axis=1)
            assert turn["answer"] == str(classes[first_seen.argmin()])
            assert s["answer"] == str(classes[first_seen.argmax()])
        elif task == "direction":
            dx = positions[:, -1, 1].astype(int) - positions[:, 0, 1]
            assert turn["answer"] == str(classes[dx.argmax()]) and dx.max() > 0
            assert s["answer"] == str(classes[dx.argmin()]) and dx.min() < 0
        else:
            end = positions[:, -1].astype(int).sum(axis=1)      # y + x: bottom right is the larger
            assert turn["answer"] == str(classes[end.argmax()]) and s["answer"] == str(classes[end.argmin()])
        assert turn["answer"] != s["answer"]
        seen.add(task)
    assert seen == {"last", "direction", "corner"}


def test_digits_follow_ups_train_on_both_answers_and_are_budgeted_exactly():
    """Training clips carry the follow-up turn (the balancer's table counts its tokens exactly);
    held-out clips do not."""
    from conftest import tiny_overrides
    from stts_dist.config import load_config
    from stts_dist.data.batch import IGNORE, SequenceBuilder
    from stts_dist.samples import digits_table
    from stts_dist.samples.build import digits_dataset
    from stts_dist.stts.budget import TokenBudget
    from stts_dist.tokenizer import default_tokenizer
    cfg = load_config(None, tiny_overrides(**{"data.follow_up_questions": "[direction,corner]", "data.min_frames": 3}))
    budget, tok = TokenBudget.from_model_config(cfg.model), default_tokenizer()
    train, held_out = digits_dataset(cfg, "train"), digits_dataset(cfg, "eval")
    assert train.follow_ups == ("direction", "corner") and held_out.follow_ups == ()
    table = digits_table(budget, train, tok)
    build = SequenceBuilder(tok, budget, cfg.model.vit.image_size)
    samples = [train[i] for i in range(24)]
    batch = build(samples)
    assert batch.seq_lengths == table.llm_tokens[:24].tolist()
    targets = (batch.labels != IGNORE).int().split(batch.seq_lengths)
    # one answer word + <eos> per question: 2 targets, 4 with a follow-up (direction and corner only)
    assert [int(t.sum()) for t in targets] == [2 + 2 * len(s["turns"]) for s in samples]
    assert [len(s["turns"]) for s in samples] == [int(s["task"] in ("direction", "corner")) for s in samples]
    assert {len(s["turns"]) for s in samples} == {0, 1}
    assert all("turns" not in held_out[i] for i in range(8))


def test_follow_up_questions_name_the_tasks_that_have_one():
    """Only digits tasks with a mirror question (and in data.tasks) can be named; the main job's
    file still serves a user's manifest (data.source=manifest), whose follow-ups are its turns."""
    from stts_dist.config import ConfigError, load_config
    cfg = load_config("jobs/default.yaml", ["data.source=manifest", "data.path=x.jsonl"])
    assert list(cfg.data.follow_up_questions) == ["direction", "corner"]      # unused: no digits clips
    with pytest.raises(ConfigError, match=r"\['count'\] is not among .* choose from \['last', 'direction', 'corner'\]"):
        load_config(None, ["data.follow_up_questions=[count,corner]"])


def test_a_run_file_with_the_older_boolean_follow_ups_loads_as_the_list(tmp_path):
    """Checkpoints written while data.follow_up_questions was a boolean (true: every task's
    mirror) still open: their config.yaml loads as the list of tasks."""
    from stts_dist.config import load_config
    for value, tasks, expected in (("true", None, ["last", "direction", "corner"]),
                                   ("true", "[count, corner]", ["corner"]), ("false", None, [])):
        path = tmp_path / "run.yaml"
        path.write_text(f"data:\n  follow_up_questions: {value}\n" + (f"  tasks: {tasks}\n" if tasks else ""))
        assert list(load_config(path).data.follow_up_questions) == expected
