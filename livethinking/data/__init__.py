"""Livestream data (floor 1): records, JSONL loading, the synthetic demo set."""

from livethinking.data.demo import (ATTRIBUTES, QUESTION_KEYWORDS, REFUSAL_MARKERS, DemoPaths,
                                    DemoTeacher, Product, asked_attribute, format_product_doc,
                                    make_demo, parse_product_doc, split_response)
from livethinking.data.jsonl import (DataError, LoadResult, load_records, load_teacher_samples,
                                     write_jsonl, write_text_atomic)
from livethinking.data.records import LivestreamRecord, TeacherSample, Turn

__all__ = ["Turn", "LivestreamRecord", "TeacherSample", "DataError", "LoadResult",
           "load_records", "load_teacher_samples", "write_jsonl", "write_text_atomic",
           "ATTRIBUTES", "QUESTION_KEYWORDS", "REFUSAL_MARKERS", "format_product_doc",
           "parse_product_doc", "asked_attribute", "split_response", "make_demo", "DemoPaths",
           "DemoTeacher", "Product"]
