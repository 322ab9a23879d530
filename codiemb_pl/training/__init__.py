"""Training: the LightningModule, the gradient cache, RNG state, sharding, durable checkpoint IO, the trainer and resume rules."""
