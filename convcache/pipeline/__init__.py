"""Orchestration across stages (compare, the demo): it calls each stage's Python entry point; no
stage imports it."""
