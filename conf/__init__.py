"""Hydra configs, installed as this package so the console scripts find them from any folder."""
