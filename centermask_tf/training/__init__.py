"""Training: `train.train()` (model.fit), the multi-worker loop, the optimiser and the epoch callbacks."""
