"""The relevance task (TaoSR1, arXiv 2508.12365): grade how well a product document
matches a search query on four tiers, 4-Excellent, 3-Related, 2-Mismatch, 1-Irrelevant.

:mod:`~.records` holds the record and its JSONL IO; :mod:`~.responses` the labels and the
two response formats (``cot``: think, then label; ``post_cot``: label first, the deployed
form); :mod:`~.prompt` the chat prompt; :mod:`~.rules` the query grammar, the tier rule
and the mechanical reasoning; :mod:`~.demo_data` the synthetic set; :mod:`~.demo_teacher`
its programmatic teacher; :mod:`~.tiering` cumulative-probability tiering of the label
token's distribution and its metrics. Its rule judges are
``livethinking.rewards.relevance_judges``.
"""

from livethinking.tasks.relevance.demo_data import RelevancePaths, make_relevance_demo
from livethinking.tasks.relevance.demo_teacher import relevance_teacher
from livethinking.tasks.relevance.prompt import (DEFAULT_RELEVANCE_PROMPT, TIER_DEFINITIONS,
                                                 format_instructions, messages)
from livethinking.tasks.relevance.records import (RelevanceRecord, load_relevance_records,
                                                  write_relevance_records)
from livethinking.tasks.relevance.responses import (LABEL_TEXTS, OUTPUT_FORMATS, TIERS,
                                                    ParsedResponse, format_label,
                                                    format_response, parse_label,
                                                    parse_response)
from livethinking.tasks.relevance.rules import (Query, format_query, parse_query,
                                                reasoning_steps, reference_reasoning,
                                                relevance_label)
from livethinking.tasks.relevance.tiering import (CUMPT_TOLERANCE, accuracy, calibrate_tau,
                                                  cumpt, label_distribution, label_token_ids,
                                                  macro_f1)

__all__ = [
    "CUMPT_TOLERANCE", "DEFAULT_RELEVANCE_PROMPT", "LABEL_TEXTS", "OUTPUT_FORMATS",
    "TIER_DEFINITIONS", "TIERS", "ParsedResponse", "Query", "RelevancePaths", "RelevanceRecord",
    "accuracy", "calibrate_tau", "cumpt", "format_instructions", "format_label",
    "format_query", "format_response", "label_distribution", "label_token_ids",
    "load_relevance_records", "macro_f1", "make_relevance_demo", "messages", "parse_label",
    "parse_query", "parse_response", "reasoning_steps", "reference_reasoning",
    "relevance_label", "relevance_teacher", "write_relevance_records",
]
