"""The repository's Python models, one per module (triton_repo/serving.py is their index)."""
