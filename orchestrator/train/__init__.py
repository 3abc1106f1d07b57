"""The per-rank training runtime."""
