"""Training, the one stateful layer: the step (engine.train_step) and its stages (batch: the typed
records; passes: the statistics and accounting forwards; objective: the method's parts; update: the
optimizer updates; accounting), the run's objects (session), the run around the steps (loop,
checkpoints, evaluation, trackers), rollouts (rollout), cross-process reductions (parallel), the
dry-run plan and memory estimate (plan, memory), predict-entropy (predict)."""
