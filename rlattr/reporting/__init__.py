"""Reporting: one score summary for SB3 and TRL, tables, TensorBoard writer, plots, the HTML report."""
