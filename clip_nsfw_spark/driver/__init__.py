"""The driver: the user's config, planning, output checks, progress, the report, the run."""
