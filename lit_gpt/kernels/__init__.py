"""Fused attention kernels (Triton). Each module imports Triton itself and says what it supports."""
