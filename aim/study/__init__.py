"""A small trained video LLM for studying aim: synthetic video / image QA, model, training, evaluation.

- :mod:`aim.study.data`: deterministic synthetic video and image QA (answers need evidence spread
  over frames and space; textured, redundant backgrounds).
- :mod:`aim.study.model`: the LLaVA-OneVision-class study model built from transformers' classes,
  its offline processor, :func:`~aim.study.model.load_default_model` (the trained weights shipped
  in ``aim/default_model``) and :func:`~aim.study.model.to_inputs` (examples -> model inputs).
- :mod:`aim.study.train`: ``python -m aim.study.train --out DIR`` trains it from scratch on CPU.
- :mod:`aim.study.evaluate`: accuracy overall and per question kind (works on aim-patched models);
  ``python -m aim.study.evaluate`` prints the default model's test accuracy.

The submodules import transformers; import them explicitly (``from aim.study import data``).
"""
