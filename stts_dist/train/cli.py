"""``stts-train --config jobs/default.yaml [key=value ...]`` (also ``python -m stts_dist.train``)."""
from __future__ import annotations

import argparse
import json
import sys

from stts_dist.config import ConfigError, load_config
from stts_dist.console import quiet_known_warnings


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Train a video VLM with STTS token pruning")
    ap.add_argument("--config", default="jobs/default.yaml", help="run config (YAML under jobs/)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 model.stts.prune_ratio=0.8")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    quiet_known_warnings()
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from stts_dist.train.trainer import Preempted, Trainer
    trainer = Trainer(cfg)
    try:
        results = trainer.fit()
        if trainer.is_rank0 and results:
            _print_summary(results, len(trainer.eval_set), trained_method=trainer.cfg.model.stts.method)
        return 0
    except Preempted as e:
        print(f"[train] {e}; checkpoint written, resume by starting the same command again", flush=True)
        return Preempted.exit_code
    finally:
        trainer.close()


def _print_summary(results: dict, n: int, trained_method: str = "none") -> None:
    """The final evaluation as a table: accuracy overall and per task, visual tokens, and -- where
    the data annotates its objects (digits) -- the share of the objects' groups each setting kept.
    ``trained_method``: the run's ``model.stts.method`` (a pruned model's ``none@0`` row is not an
    unpruned baseline, and the table says so)."""
    rows = sorted({k.split("/")[1] for k in results if k.startswith("eval/") and k.endswith("/acc")})
    tasks = sorted({k.split("/")[-1] for k in results if k.startswith("eval/") and "/acc/" in k})
    print(f"\n=== eval on {n} held-out clips: exact-match accuracy (standard error of the overall figure) ===")
    objects = any(k.endswith("/obj_recall") for k in results)
    head = f"{'inference':<14}{'acc':>14}" + "".join(f"{t:>11}" for t in tasks) + f"{'LLM tokens':>12}"
    head += f"{'obj recall':>12}" if objects else ""
    print(head)
    for tag in rows:
        acc = results[f"eval/{tag}/acc"]
        se = (acc * (1 - acc) / max(n, 1)) ** 0.5
        line = f"{tag:<14}{acc:>8.3f} ±{se:.3f}" + "".join(f"{results.get(f'eval/{tag}/acc/{t}', float('nan')):>11.3f}"
                                                         for t in tasks)
        line += f"{results[f'eval/{tag}/llm_visual_tokens']:>12.1f}"
        if objects:
            recall = results.get(f"eval/{tag}/obj_recall")
            line += f"{recall:>12.3f}" if recall is not None else f"{'-':>12}"
        print(line)
    if objects:
        print("obj recall: share of the groups of frames >= 1 holding part of a digit that the setting kept "
              "(stts-eval shows precision and coverage too)")
    if "none@0" in rows and trained_method != "none":
        print("none@0: this same model given every visual token, which it did not train on; the unpruned "
              "baseline is a model trained with model.stts.method=none")
    if "eval/unknown_word_share" in results:
        print(f"held-out words outside the training vocabulary: {100 * results['eval/unknown_word_share']:.1f}%")
    print(json.dumps({k: round(v, 4) for k, v in results.items() if k.endswith('/acc') or k.endswith('/obj_recall')}))


if __name__ == "__main__":
    sys.exit(main())
