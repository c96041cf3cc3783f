"""Detector models of hf_kd."""
