"""repinf_lens: representation-level influence functions for TransformerLens and SAELens.

Which training examples, which SAE latents inside them, and which tokens made a language model give an
answer (arXiv 2605.12809, "Correcting Influence", RepInfLLM).

Sign convention, everywhere in this package: a POSITIVE influence score marks a proponent, i.e. up-weighting
the training example lowers the test loss (score = + g_test^T (H + lambda I)^-1 g_train).
"""

from repinf_lens import analysis, data, saes, testing, viz
from repinf_lens._cache import OfflineAssetError, cache_dir
from repinf_lens._version import __version__
from repinf_lens.analysis import (
    leave_one_out,
    linear_datamodeling_score,
    necessity_sufficiency,
    orthogonality,
    orthogonality_table,
)
from repinf_lens.curvature import CG, Explicit, Identity, InverseHessianSolver, LiSSA, register_solver
from repinf_lens.data import load_mcqa
from repinf_lens.errors import CorruptFileError, NonFiniteError, RepinfLensError, SettingsError
from repinf_lens.finetuning import FinetuneConfig, FinetuneResult, finetune, merge_adapter
from repinf_lens.influence import (
    InfluenceAttributor,
    InfluenceResult,
    example_influence,
    latent_influence,
    latent_influence_multi,
    latent_influence_reference,
)
from repinf_lens.influence.check import SplitCheck, SplitCheckError, check_split
from repinf_lens.lora import LoraSplit, lora_split_from_peft
from repinf_lens.models import DEFAULT_MODEL, UnknownModelError, load_hf_model, load_model
from repinf_lens.prefiltering import (
    GradientSketcher,
    ManifestMismatchError,
    PrefilterResult,
    SketchStore,
    build_sketches,
    prefilter,
    sketch_overlap,
)
from repinf_lens.saes import (
    SAETrainingConfig,
    collect_activations,
    layer_sweep,
    load_sae,
    publish_saes,
    train_sae,
)
from repinf_lens.split import HookNameError, SAECompatibilityError, SplitConfigError, SplitInputs, SplitModel
from repinf_lens.task import (
    CompletionTask,
    MCQABatch,
    MissingCapabilityError,
    MultipleChoiceTask,
    PromptTooLongError,
    Task,
    evaluate,
    mcqa_to_completion,
    parse_option,
    predict,
)

__all__ = [
    "CG",
    "DEFAULT_MODEL",
    "CompletionTask",
    "CorruptFileError",
    "Explicit",
    "FinetuneConfig",
    "FinetuneResult",
    "GradientSketcher",
    "HookNameError",
    "Identity",
    "InfluenceAttributor",
    "InfluenceResult",
    "InverseHessianSolver",
    "LiSSA",
    "LoraSplit",
    "MCQABatch",
    "ManifestMismatchError",
    "MissingCapabilityError",
    "MultipleChoiceTask",
    "NonFiniteError",
    "OfflineAssetError",
    "PrefilterResult",
    "PromptTooLongError",
    "RepinfLensError",
    "SAECompatibilityError",
    "SAETrainingConfig",
    "SettingsError",
    "SketchStore",
    "SplitCheck",
    "SplitCheckError",
    "SplitConfigError",
    "SplitInputs",
    "SplitModel",
    "Task",
    "UnknownModelError",
    "__version__",
    "analysis",
    "build_sketches",
    "cache_dir",
    "check_split",
    "collect_activations",
    "data",
    "evaluate",
    "example_influence",
    "finetune",
    "latent_influence",
    "latent_influence_multi",
    "latent_influence_reference",
    "layer_sweep",
    "leave_one_out",
    "linear_datamodeling_score",
    "load_hf_model",
    "load_mcqa",
    "load_model",
    "load_sae",
    "lora_split_from_peft",
    "mcqa_to_completion",
    "merge_adapter",
    "necessity_sufficiency",
    "orthogonality",
    "orthogonality_table",
    "parse_option",
    "predict",
    "prefilter",
    "publish_saes",
    "register_solver",
    "saes",
    "sketch_overlap",
    "testing",
    "train_sae",
    "viz",
]
