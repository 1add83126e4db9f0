"""Diffusion model and samplers."""
