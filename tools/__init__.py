"""Development tools that are not part of the pipeline (not packaged, never imported by it)."""
