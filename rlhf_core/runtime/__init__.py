"""How a stage runs: the stage runner (cli), the launcher and its warm-start server (launch, warm), several
processes or machines (distributed, ray_launch), and what it reports while it runs (progress, stage_times)."""
