"""Evaluation: retrieval metrics (CMC, mAP, mINP) and the per-data-set test protocols."""
