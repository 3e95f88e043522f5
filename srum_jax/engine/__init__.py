"""The engine the stages drive: a loaded UMM on its mesh (`loaded_model`) and the UMM as a judge
(`judge`)."""
