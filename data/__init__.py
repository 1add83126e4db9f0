"""Datasets and the Lightning datamodule."""
