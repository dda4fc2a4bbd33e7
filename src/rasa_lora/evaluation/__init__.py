"""Evaluation: math answer checking, a hardened sandbox for generated code with pass@k, and multiple-choice scoring.

`rasa-lora eval TASK` (see `cli.py`) ties them together. Nothing heavy is imported here: each module imports
torch, transformers, math-verify or sympy only inside the functions that need them.
"""
