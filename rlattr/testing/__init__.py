"""Tiny models, tokenizers and data sets for tests, studies and demos (never downloads anything).

``supervised`` needs scikit-learn (the ``dev`` extra) for digits; ``tiny_lm`` needs transformers
(the ``trl`` extra). Import the module you need; this package imports neither.
"""
