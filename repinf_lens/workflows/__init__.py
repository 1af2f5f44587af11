"""Workflows: the stages of the main job as functions, on top of the public API, each writing its own folder.

* :mod:`~repinf_lens.workflows.config`: :class:`AttributionConfig`, the ONE set of attribution knobs used by the
  CLI (its flags are generated from the dataclass), the demo and the runners.
* :mod:`~repinf_lens.workflows.finetuning`: LoRA finetuning (peft), resumable, and shipping an adapter.
* :mod:`~repinf_lens.workflows.attribution`: prefilter, s_test, streamed and resumable scoring.
* :mod:`~repinf_lens.workflows.ablation` / :mod:`~repinf_lens.workflows.report`: ablations, the HTML report.
* :mod:`~repinf_lens.workflows.faithfulness` / :mod:`~repinf_lens.workflows.case_studies`: the paper's
  evaluations over many questions / for questions the finetune fixed.
* :mod:`~repinf_lens.workflows.demo`: ``make demo``.

Sign convention: POSITIVE influence = proponent (up-weighting the training example lowers the test loss).
"""

from repinf_lens.workflows.ablation import run_ablation
from repinf_lens.workflows.attribution import build_attributor, prefilter_candidates, run_attribution
from repinf_lens.workflows.case_studies import run_case_studies
from repinf_lens.workflows.config import AttributionConfig, solver_from_config
from repinf_lens.workflows.demo import DemoConfig, DemoResult, run_demo
from repinf_lens.workflows.faithfulness import run_faithfulness
from repinf_lens.workflows.finetuning import FinetuneConfig, FinetuneResult, finetune
from repinf_lens.workflows.report import make_report

__all__ = [
    "AttributionConfig",
    "DemoConfig",
    "DemoResult",
    "FinetuneConfig",
    "FinetuneResult",
    "build_attributor",
    "finetune",
    "make_report",
    "prefilter_candidates",
    "run_ablation",
    "run_attribution",
    "run_case_studies",
    "run_demo",
    "run_faithfulness",
    "solver_from_config",
]
