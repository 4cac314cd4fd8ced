"""The pipeline's phases, one module per stage's work: prompts (data), the tasks (tasks/), the SFT snapshot (sft),
generation (rollout; the vLLM engine: vllm_client, vllm_engine), the reward (scoring, rewards, reward_model) and
evaluation (evaluation)."""
