"""The SRUM data pipeline (spec E.5, E.6): prompt sources, region proposers, generation, scoring, formatting."""
