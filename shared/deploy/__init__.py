"""Deploying avrec on Flower's deployment engine: credentials, settings, per-device data and processes."""
