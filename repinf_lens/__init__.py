"""repinf_lens: representation-level influence functions for TransformerLens and SAELens.

Which training examples, which SAE latents inside them, and which tokens made a language model give an
answer (arXiv 2605.12809, "Correcting Influence", RepInfLLM).

Sign convention, everywhere in this package: a POSITIVE influence score marks a proponent, i.e. up-weighting
the training example lowers the test loss (score = + g_test^T (H + lambda I)^-1 g_train).
"""

from repinf_lens import analysis, data, saes, testing, viz
from repinf_lens._cache import OfflineAssetError, cache_dir
from repinf_lens.analysis import (
    leave_one_out,
    linear_datamodeling_score,
    necessity_sufficiency,
    orthogonality,
    orthogonality_table,
)
from repinf_lens.curvature import CG, Explicit, Identity, InverseHessianSolver, LiSSA
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
    MCQABatch,
    MultipleChoiceTask,
    PromptTooLongError,
    Task,
    evaluate,
    parse_option,
    predict,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "CG",
    "LoraSplit",
    "lora_split_from_peft",
    "SAETrainingConfig",
    "analysis",
    "latent_influence_multi",
    "GradientSketcher",
    "ManifestMismatchError",
    "PrefilterResult",
    "SketchStore",
    "build_sketches",
    "prefilter",
    "sketch_overlap",
    "leave_one_out",
    "linear_datamodeling_score",
    "necessity_sufficiency",
    "viz",
    "testing",
    "collect_activations",
    "layer_sweep",
    "load_sae",
    "orthogonality",
    "orthogonality_table",
    "publish_saes",
    "saes",
    "train_sae",
    "Explicit",
    "FinetuneConfig",
    "FinetuneResult",
    "HookNameError",
    "Identity",
    "InfluenceAttributor",
    "InfluenceResult",
    "InverseHessianSolver",
    "LiSSA",
    "SAECompatibilityError",
    "SplitConfigError",
    "SplitCheck",
    "SplitCheckError",
    "check_split",
    "RepinfLensError",
    "SettingsError",
    "NonFiniteError",
    "CorruptFileError",
    "SplitInputs",
    "SplitModel",
    "example_influence",
    "latent_influence",
    "latent_influence_reference",
    "DEFAULT_MODEL",
    "MCQABatch",
    "MultipleChoiceTask",
    "OfflineAssetError",
    "PromptTooLongError",
    "Task",
    "UnknownModelError",
    "__version__",
    "cache_dir",
    "data",
    "evaluate",
    "finetune",
    "merge_adapter",
    "load_hf_model",
    "load_mcqa",
    "load_model",
    "parse_option",
    "predict",
]
