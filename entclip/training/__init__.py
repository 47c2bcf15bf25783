"""Training, the one stateful layer: the step (engine), the run around it (loop), the objective's
configurable parts (objective), rollouts (rollout), entropy accounting, evaluation, checkpoints,
cross-process reductions (parallel), the dry-run plan and memory estimate, trackers, predict-entropy."""
