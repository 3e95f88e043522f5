"""The SRUM data pipeline (docs/bagel.md, "SRUM training recipe"): prompt sources, region proposers,
generation, scoring, formatting."""
