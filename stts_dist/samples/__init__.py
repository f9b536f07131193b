"""The sample-source stack: where every training, evaluation and benchmark sample comes from.

    sampler  (samplers.py)  which rows each global step draws: PermutationSampler | ShardOrderSampler
       |
    split    (splits.py)    which of them this data-parallel rank reads: StridedSplit | BalancedSplit
       |
    reader   (readers.py)   rows -> samples, generated / decoded in loader workers:
       |                    DigitsReader | ShardReader | ManifestReader
    collate                 the trainer's SequenceBuilder (packed sequences), or none (held-out sets)

One feature per stage; each stage declares its own saved state (the sampler its cursor, the
balanced split its step and deferred samples, the reader none), and :class:`SampleStack`
composes them (``stack.py``). ``build.py`` assembles the run's stack from its config; the
held-out sets (``stts_dist/heldout.py``) read through the same readers; ``tables.py`` is the
metadata the balancer plans with. No trainer, engine or tracker is imported here.
"""
from stts_dist.samples.build import check_clip_lengths, digits_dataset, training_stack
from stts_dist.samples.readers import DigitsDataset, DigitsReader, ManifestReader, ShardReader
from stts_dist.samples.samplers import PermutationSampler, ShardOrderSampler
from stts_dist.samples.splits import BalancedSplit, StridedSplit, TokenCountMismatch
from stts_dist.samples.stack import SampleStack, upgrade_state
from stts_dist.samples.tables import digits_table, digits_text_tokens, sample_table, visual_tokens

__all__ = ["training_stack", "check_clip_lengths", "digits_dataset", "DigitsDataset", "DigitsReader",
           "ManifestReader", "ShardReader", "PermutationSampler", "ShardOrderSampler", "BalancedSplit",
           "StridedSplit", "TokenCountMismatch", "SampleStack", "upgrade_state", "digits_table",
           "digits_text_tokens", "sample_table", "visual_tokens"]
