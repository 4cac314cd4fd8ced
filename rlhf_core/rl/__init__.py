"""The RL layer: KL estimators (kl), token rewards and the advantage estimators (advantages), the per-token losses
(losses), the trust region's linear algebra (trust_region), AdamW and its state (optim), and the algorithms:
their registry of traits and the update loops (algorithms/)."""
