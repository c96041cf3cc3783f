"""Conversion of checkpoints from other detection codebases."""
