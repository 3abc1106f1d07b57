"""orch: a training orchestrator for diffusion models."""
