"""The protocol's vocabulary, named once: the roles a row can play, where a grid is chosen,
and the two rows the protocol itself is built on."""

# baseline: a reference point every run has (global, on-device fine-tuning, TENT, the EM
#   label-prior correction, the oracle);
# rival: a published forward-only test-time method this project's generators must beat (the
#   report's `best_rival` is the one validation ranks first);
# control: a row built to rule an explanation out (the data-matched global_meta, the mean,
#   noisy-mean and nearest edits);
# ablation: one of "ours" with one part changed (`ablation_of` names the row, `varies` says how);
# ours: a generator's row (cdc_mmpg, its robustness variants, DUET, Persona).
ROLES = ("baseline", "rival", "control", "ablation", "ours")

# validation devices, or the validation OOD devices (a held-out shift family) for a choice
# made for robustness
SELECT_ON = ("validation", "val_ood")

# The base every gain and margin is measured from (every run builds it:
# baselines.validate_config) and the upper bound of the margin.
BASE, ORACLE = "global", "oracle"
