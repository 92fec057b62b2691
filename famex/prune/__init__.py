"""Pruning: students cut from the teacher by depth (layers) and width (MLP channels, KV groups, hidden size).

`famex.prune.importance` scores the teacher's parts on calibration data, `famex.prune.slicing` cuts
them, `famex.prune.stage` is the `famex prune` command.
"""
