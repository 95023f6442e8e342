"""Foundations every other part builds on, knowing no task and no method: parameter pytrees
and edits (params), uploads, config errors and loading, checkpoints, the workdir, preemption,
the on-disk format of generated edits, k-means, recommendation metrics, the traffic codecs."""
