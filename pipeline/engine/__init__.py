"""Parts the training stages share: devices and AMP, seeding, DDP, checkpoints, W&B."""
