"""Around the pipeline: MLflow tracking (tracking), the code and input fingerprints that DVC depends on
(fingerprints), the generated docs (docs) and the `rlhf` command (commands/)."""
