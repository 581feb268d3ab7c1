"""Data: sources (bundled, local files, Hugging Face hub), partitioners and tasks."""
