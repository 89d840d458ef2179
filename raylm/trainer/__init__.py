"""The per-rank runtime: one stage's training loop on one rank, its checkpoints, metrics, watchdog and the
run directory's layout. It never imports Ray, so it runs unchanged under Ray Train (through
``raylm.launcher.ray_entry``) and under ``torchrun`` (``python -m raylm.trainer.torchrun_main``)."""
