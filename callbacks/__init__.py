"""Framework adapters, installed as ``rlattr.callbacks``: stable-baselines3 and TRL.

Importing this package does not import SB3 or TRL; each adapter module does, on first use.
"""
