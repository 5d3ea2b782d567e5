"""Tools over a finished cache: validate (integrity), verify (recompute), inspect's statistics
and plots.
"""
