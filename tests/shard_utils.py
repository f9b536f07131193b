"""A tiny shard folder written in-process (no Ray), for the tests of what reads shards."""


def tiny_shards(tmp_path, follow_up_turns=None):
    """12 variable-length digits clips (2..12 frames) sharded in-process (no Ray), npy frames.
    ``follow_up_turns(row) -> [{"question", "answer"}, ...]`` adds turns to the manifest's lines."""
    import json

    from omegaconf import OmegaConf

    from data_pipeline.build_shards import file_sha256, make_plan, write_index, write_vocabulary
    from data_pipeline.config import ShardingConfig
    from data_pipeline.manifest import read_manifest
    from data_pipeline.records import text_token_counter
    from data_pipeline.shard_worker import process_unit
    from data_pipeline.synth_digits import write_synthetic
    from stts_dist.data.digits import make_sample

    def variable(index, seed, frames, size, tasks, split="train"):
        return make_sample(index, seed, 2 + (index * 5) % 11, size, tasks, split)
    manifest = write_synthetic(tmp_path / "src", 12, 12, 32, 0, sample_fn=variable)
    if follow_up_turns is not None:
        lines = [json.loads(line) for line in manifest.read_text().splitlines()]
        manifest.write_text("".join(json.dumps({**line, "turns": follow_up_turns(row)}) + "\n"
                                    for row, line in enumerate(lines)))
    out = tmp_path / "shards"
    out.mkdir()
    cfg = OmegaConf.structured(ShardingConfig(manifest=str(manifest), out_dir=str(out), image_size=32, patch_size=8,
                                              pool_size=2, fps=0.0, max_frames=12,
                                              frame_format="npy", samples_per_shard=6))
    entries = read_manifest(manifest)
    plan = make_plan(entries, cfg, file_sha256(manifest), text_token_counter()[1], 1)
    results = [process_unit(u, [e.to_dict() for e in entries[u * 6:(u + 1) * 6]], OmegaConf.to_container(cfg),
                            str(out), plan["plan_hash"]) for u in range(2)]
    write_vocabulary(out, entries)
    write_index(out, plan, results)
    return out
