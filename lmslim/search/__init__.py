"""Budgeted search across pruning, distillation and quantization, measured in the deployment engine.

``study`` runs the Optuna study, ``space`` maps a draw to recipe stages, ``trials`` runs one recipe
through ``lmslim compress``, ``front`` re-measures the Pareto front and writes the answer,
``budget`` parses the budget and the objective.
"""
