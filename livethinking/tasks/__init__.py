"""Task domains (floor 1): each holds its domain's rules — document formats and their
parsers, the vocabulary its judges match, its demo data maker and programmatic teacher.

- :mod:`livethinking.tasks.livestream`: an e-commerce livestream assistant answering
  viewers' questions from a product document.
"""
