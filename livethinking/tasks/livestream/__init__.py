"""The livestream task: a viewer asks about a product during a livestream; the assistant
answers from the product document only (or politely says the document does not say).

:mod:`~.domain` holds the rules every part shares (the product document format, the
attribute vocabulary, which attribute a question asks about, reasoning/answer split);
:mod:`~.demo_data` writes the synthetic set; :mod:`~.demo_teacher` is its programmatic
teacher. The record type is :class:`livethinking.data.LivestreamRecord`.
"""

from livethinking.tasks.livestream.demo_data import DemoPaths, make_demo
from livethinking.tasks.livestream.demo_teacher import DemoTeacher
from livethinking.tasks.livestream.domain import (ATTRIBUTES, QUESTION_KEYWORDS,
                                                  REFUSAL_MARKERS, WEAK_KEYWORDS,
                                                  AttributeKeywords, Product, asked_attribute,
                                                  format_product_doc, parse_product_doc,
                                                  split_response)

__all__ = ["ATTRIBUTES", "QUESTION_KEYWORDS", "REFUSAL_MARKERS", "WEAK_KEYWORDS",
           "AttributeKeywords", "DemoPaths", "DemoTeacher", "Product", "asked_attribute",
           "format_product_doc", "make_demo", "parse_product_doc", "split_response"]
