"""File names inside a run directory (see the README's run-directory section)."""

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
DRIVER_FILE = "driver.json"
FINAL_DIR = "final"
STAGE_SUMMARY = "summary.json"
LOGS_DIR = "logs"
WANDB_DIR = "wandb"


def rank_log_name(rank: int) -> str:
    return f"rank_{rank:03d}.log"
