"""The oracle (stage 1 of TRACE): judge (prompt, response) pairs under a policy.

Public API:

* :class:`Verdict`, :class:`JudgeItem`, :class:`Judge` -- the judge interface (``base``).
* :func:`make_judge` -- a judge from a config dict or model (``config``: openai, vllm,
  transformers, annotations).
* :class:`VerdictCache`, :func:`judge_with_cache`, :func:`correct_with_cache` -- the persistent cache
  that makes an identical question cost once and lets an interrupted job resume (``cache``);
  :func:`judge_with_fallback` -- the same with a second judge for low-confidence verdicts.
* :func:`judge_agreement` -- accuracy, Cohen's kappa and confusion matrix against reference labels;
  :func:`check_unknown_share` -- the stop for a run whose judge left too many verdicts unknown
  (``quality``).
* ``local_judges`` (imported from its module, like the backends) --
  :class:`~trace_realign.core.oracle.local_judges.EmbeddingComplianceJudge`,
  :class:`~trace_realign.core.oracle.local_judges.RefusalAwareJudge` and
  :func:`~trace_realign.core.oracle.local_judges.fit_local_judge`: judges of generated text trained
  on another judge's verdicts, with their held-out accuracy.
"""

from trace_realign.core.oracle.base import Judge, JudgeItem, Verdict, judge_items
from trace_realign.core.oracle.cache import VerdictCache, correct_with_cache, judge_with_cache, judge_with_fallback
from trace_realign.core.oracle.config import (
    AnnotationsJudgeConfig,
    OpenAIJudgeConfig,
    TransformersJudgeConfig,
    VLLMJudgeConfig,
    parse_judge_config,
)
from trace_realign.core.oracle.factory import make_judge
from trace_realign.core.oracle.quality import check_unknown_share, judge_agreement, verdict_triples

__all__ = [
    "AnnotationsJudgeConfig",
    "Judge",
    "JudgeItem",
    "OpenAIJudgeConfig",
    "TransformersJudgeConfig",
    "VLLMJudgeConfig",
    "Verdict",
    "VerdictCache",
    "check_unknown_share",
    "correct_with_cache",
    "judge_agreement",
    "judge_items",
    "judge_with_cache",
    "judge_with_fallback",
    "make_judge",
    "parse_judge_config",
    "verdict_triples",
]
