"""The model layer: loading policies, critics and tokenizers (local directories or Hub ids), LoRA, batches, the
forward pass that rollout and training share (models), chat templates (chat), the from-scratch tiny models
(local_models) and merged exports (export).  Imports errors, io and config below it."""
