"""Task domains (floor 1): each holds its domain's rules — document formats and their
parsers, the vocabulary its judges match, its demo data maker and programmatic teacher.

- :mod:`livethinking.tasks.livestream`: an e-commerce livestream assistant answering
  viewers' questions from a product document.
- :mod:`livethinking.tasks.relevance`: query-product relevance on four tiers (TaoSR1), its
  CoT and label-first response formats, rule judges and cumulative-probability tiering.
"""
