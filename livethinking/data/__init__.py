"""Livestream data (floor 1): the record types and their strict JSONL loading and atomic
writing. The task's rules and its synthetic demo set live in
:mod:`livethinking.tasks.livestream`."""

from livethinking.data.jsonl import (DataError, LoadResult, load_json_lines, load_records,
                                     load_teacher_samples, load_texts, write_jsonl,
                                     write_text_atomic)
from livethinking.data.records import LivestreamRecord, TeacherSample, Turn

__all__ = ["Turn", "LivestreamRecord", "TeacherSample", "DataError", "LoadResult",
           "load_json_lines", "load_records", "load_teacher_samples", "load_texts", "write_jsonl",
           "write_text_atomic"]
