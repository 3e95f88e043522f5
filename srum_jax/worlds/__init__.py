"""Synthetic worlds: small, fully known domains to pretrain a tiny UMM on and to score it with an
independent oracle (`shapes`: coloured shapes on a black 32x32 canvas, T2I-CompBench-like
categories)."""
