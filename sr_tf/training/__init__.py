"""Trainers (custom ``train_step``) and the one distributed training loop."""
