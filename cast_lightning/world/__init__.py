"""The embedded world: a generated task world and its small base model, so the whole pipeline runs offline.

``generator`` builds the world from a seed (utility skills, harmful requests, benign look-alikes, a tokenizer) and
writes the evaluation prompt sets (``write_eval_sets``); ``base_model`` pretrains and caches the unaligned base model
on it (``ensure_base_model``) and holds its quick checks (``measure``, ``quick_safety_sft``).
"""
