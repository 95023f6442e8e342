"""The FDA (Fast Domain Adaptor) and what every method built on it shares.

  model.py       the hypernetwork: an upload's anchors (+ summary) -> an edit of the device
                 model's parameter pytree (pure; vmap over devices)
  per_leaf.py    the same network one module per piece: the layout of older checkpoints (and
                 their converter) and the reference the stacked model is tested against
  round_trip.py  one device's round trip: ADR anchors up, the FDA's edit down, merge
  stage.py       its episodic meta-training stage over simulated meta devices
  reference.py   its reference set: meta-training devices' codes and edits

The method families built on it (adapt/cdc_mmpg.py, adapt/cdc_robust/) import from here,
never from each other.
"""
