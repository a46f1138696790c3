"""The stage names, in order (imported by the CLI without importing Prefect)."""

STAGES = ("load", "judge", "triage", "reference", "train", "evaluate")
