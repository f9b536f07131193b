"""Entry-point warning filters: the known third-party messages are silenced, others are not."""
import warnings

from stts_dist.console import quiet_known_warnings


def test_known_third_party_warnings_are_filtered_and_others_kept():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                      "`torch.distributed.all_gather_single` instead.", FutureWarning)
        warnings.warn("`torch.distributed.reduce_scatter_tensor` is deprecated.", FutureWarning)
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning)
        warnings.warn("`torch.distributed.all_reduce` is deprecated.", FutureWarning)   # not on the list
        warnings.warn("skipping corrupt video clip_3.mp4", UserWarning)
    assert [str(w.message) for w in caught] == ["`torch.distributed.all_reduce` is deprecated.",
                                                 "skipping corrupt video clip_3.mp4"]
