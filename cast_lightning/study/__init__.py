"""The study behind ``cast report`` and ``cast demo``, one job per file; data flows one way:

``plan`` (the study YAML: variants, ratios, seeds) -> ``stages`` (cached ``cast diagnose`` / ``cast fit`` /
``cast eval`` runs from the recipe YAMLs -> ``experiments.json``) -> ``analysis`` (``utility`` and
``statistics``: experiments -> the report dictionary) -> ``plots`` and ``render`` (``report.md``/``.html``/``.json``).
``commands`` holds the two thin subcommands. Nothing outside this package imports it.
"""
