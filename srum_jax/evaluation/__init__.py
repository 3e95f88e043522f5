"""Paper-comparable evaluation: the benchmarks' own metrics over generated (or any) images.

    compbench.py     T2I-CompBench: BLIP-VQA, detector spatial / numeracy, CLIPScore, 3-in-1 (rules
                     + scorer)
    text.py          reading its prompts: noun chunks, objects, relation, counts (spaCy or
                     deterministic rules)
    detectors.py     OWLv2 / OWL-ViT (open vocabulary) and Mask2Former (GenEval's) behind one
                     interface
    mllm_judge.py    the external 0-100 MLLM judge (Qwen2.5-VL class), question from the texts
                     (`rewards.texts`)
    geneval.py       GenEval's metadata, detection filtering, colour and position rules
    reasonbench.py   T2I-ReasonBench's two-turn protocol through the MLLM judge
    images.py        images made elsewhere matched to a prompt set
    report.py        per-category tables (markdown + json), models side by side, captioned grids
    torch_models.py  device / dtype, CLIP and BLIP-VQA wrappers (PyTorch; evaluation only)
    random_models.py tiny random models of every class above (plumbing checks without weights)

The stage that drives generation and scoring is `srum_jax.pipeline.evaluate` (`python -m srum_jax
eval`).
"""
