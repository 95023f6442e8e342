"""Device-side adaptation methods: baselines (global, FTA, TENT, prior_em, oracle); later
ADR/FDA (CDC-MMPG), Persona and DUET."""
