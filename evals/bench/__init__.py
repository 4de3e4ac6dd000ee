"""`moa-plan bench`: MoA attention kernels and decode throughput against dense SDPA and FlexAttention.

``cli`` (the command and its run), ``kernels`` (the GPU measurements), ``baselines``
(FlexAttention, SDPA backends), ``cases`` (shapes and plans), ``timing``, ``decoder`` (the
whole-model decode step), ``sweep`` (kernel tuning) and ``report`` (markdown).
"""
