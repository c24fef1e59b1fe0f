"""Planning on top of the estimator: what fits (fit), what each optimization saves (ladder), and writing a
budget to disk (export). Pure Python, no torch."""
