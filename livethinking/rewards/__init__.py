"""Rewards and judges (floor 1): the livestream task's rule and LLM judges of correctness
and helpfulness, the relevance task's label and format judges, the length-band reward,
their weighted GRPO total and the RFT acceptance rule."""

from livethinking.rewards.base import Judge, Verdict, check_batch
from livethinking.rewards.combined import (LivestreamReward, RewardBreakdown, RewardWeights,
                                           is_accepted)
from livethinking.rewards.length import LengthBand, mean_length
from livethinking.rewards.llm_judge import DEFAULT_RUBRICS, JUDGE_KINDS, LLMJudge, parse_verdict
from livethinking.rewards.relevance_judges import (RelevanceFormatJudge, RelevanceLabelJudge,
                                                   relevance_judges)
from livethinking.rewards.rule_judges import (AnswerFacts, RuleCorrectnessJudge,
                                              RuleHelpfulnessJudge, Vocabulary, token_f1)

__all__ = [
    "AnswerFacts", "DEFAULT_RUBRICS", "JUDGE_KINDS", "Judge", "LLMJudge", "LengthBand",
    "LivestreamReward", "RelevanceFormatJudge", "RelevanceLabelJudge", "RewardBreakdown",
    "RewardWeights", "RuleCorrectnessJudge", "RuleHelpfulnessJudge", "Verdict", "Vocabulary",
    "check_batch", "is_accepted", "mean_length", "parse_verdict", "relevance_judges",
    "token_f1",
]
