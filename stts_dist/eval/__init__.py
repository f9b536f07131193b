"""``stts-eval``: accuracy, token counts and prefill speed of a checkpoint over a pruning sweep.

    stts-eval --checkpoint runs/digits [--data digits|shards:DIR|manifest:FILE] \\
              [--ratios 0,0.3,0.5,0.7,0.8] [--methods scorer,random,uniform,temporal_diff,none] \\
              [--frames T] [--tts-factor 2] [--adaptive S] [--samples N] [--out DIR] [--mlflow-uri URI]
    torchrun --nproc-per-node 4 -m stts_dist.eval --checkpoint ...     # data parallel

Settings evaluated (every one on the same samples and batches; ``settings.py``):
- ``none@0``: the unpruned baseline (always; the speed-up column is relative to it);
- every pruning method at every ratio > 0 (ratio 0 is the baseline for every method);
- test-time scaling (``--tts-factor k``, 0 or 1 = off): every pruning method at ``k*T`` frames
  with the ratio set so the LLM sees exactly ``G*T`` visual tokens per video, the unpruned
  model's budget at ``T`` frames (r = 1 - 1/k, nudged to the float for which
  ``int(G*r*kT) == G*(kT - T)`` exactly).
- adaptive budgets (``--adaptive S``, 0 = off): every pruning method at every ratio > 0 with the
  per-video budgets of ``stts/adaptive.py`` at strength ``S`` (same mean ratio per batch, static
  clips pruned more, busy ones less), next to the fixed ratio on the same samples.

Metrics: exact-match accuracy (``evaluation.normalize_answer``) overall and per task, mean LLM
visual tokens and ViT patches per video, and prefill time (median over batches of ViT + scorer +
connector + LLM prompt forward) with its speed-up over ``none@0``.

Data parallel (``run.py``): under torchrun each rank takes samples ``rank::world_size``, counts
are summed with ``all_reduce`` (gloo), batch timings gathered; rank 0 prints and writes the table,
JSON, CSV and PNG (accuracy vs LLM tokens kept, one line per method; ``report.py``) and logs to
MLflow (through ``stts_dist/tracking/mlflow_results.py``).

The modules, one concern each (the engine itself, ``Setting`` / ``Tally`` / ``run_setting`` /
``reduce_tallies``, is ``stts_dist/evaluation.py``; the held-out sources ``stts_dist/heldout.py``):

- ``settings.py``: what to evaluate: the settings and ratios planned from the options;
- ``run.py``: running them over each rank's samples, the reduction over ranks, the rows;
- ``report.py``: the console table, results.json / .csv, the plot, the tracked metrics;
- ``cli.py``: the options, their checks and the order of the work (``run_eval``, ``main``).
"""
from stts_dist.eval.cli import build_parser, main, run_eval
from stts_dist.eval.report import (COVERAGE_COLUMNS, default_out_dir, format_table, log_to_mlflow, write_csv,
                                   write_outputs)
from stts_dist.eval.run import dist_context, evaluate, gather_unknown_words, run_settings, summarize
from stts_dist.eval.settings import (DEFAULT_METHODS, DEFAULT_RATIOS, parse_floats, parse_methods, plan_settings,
                                     ratio_for_budget)

__all__ = ["main", "run_eval", "build_parser", "ratio_for_budget", "plan_settings", "parse_floats", "parse_methods",
           "DEFAULT_RATIOS", "DEFAULT_METHODS", "evaluate", "run_settings", "summarize", "dist_context",
           "gather_unknown_words", "format_table", "write_csv", "write_outputs", "default_out_dir", "COVERAGE_COLUMNS",
           "log_to_mlflow"]
