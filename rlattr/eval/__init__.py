"""Evaluation: ground truth by retraining, metrics (LDS, LOO correlation, AUC), sample efficiency,
the local validity of RL scorers, and the schema of every results document.

Sits beside :mod:`rlattr.rl` and uses :mod:`rlattr.core`; ``rl_validity`` also uses ``rl``.
"""
