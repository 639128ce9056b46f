"""Executors: one task read, scored and written (worker, reader, writer)."""
