"""``dmdl report``: per-epoch tables, figures and run comparisons from what a workspace logged.

``logs`` reads ``WS/stage*/log.jsonl`` and ``WS/eval/*.json``; ``tables`` turns them into the
per-epoch and comparison tables (console, markdown, CSV); ``figures`` draws the PNGs; ``build``
is the stage the CLI calls.
"""
